"""Distributed mistakes a user can make: one sentence each, exit status 2, nothing left behind."""

from __future__ import annotations

import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from segplat.config import check_config
from segplat.data.datamodule import DataModule
from segplat.errors import ConfigError
from segplat.utils import dist
from tests.conftest import compose_train
from tests.distributed.launch_utils import BASE, env_for, free_port, plain_cmd, run, torchrun_cmd

pytestmark = pytest.mark.distributed


@pytest.mark.slow
def test_global_batch_not_divisible_is_refused_before_the_store_is_prepared(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    env = env_for(tmp_path / "logs", SEGPLAT_CACHE=str(cache))
    res = run(torchrun_cmd([*BASE, "dataset.batch_size=3", "run_name=odd"], nproc=2), env)
    assert res.returncode != 0
    assert "error: dataset.batch_size=3 is the global batch and must divide evenly over 2 processes" in res.stderr
    assert "Traceback" not in res.stderr.split("error: dataset.batch_size")[0][-2000:]
    assert not (cache / "stores").exists() or not any((cache / "stores").iterdir())


def test_val_batch_checked_in_setup_with_its_own_key() -> None:
    dm = DataModule(name="x", layout={}, requires_root=False, batch_size=4, val_batch_size=6)
    with pytest.raises(ConfigError, match=r"^dataset\.val_batch_size=6 .* over 4 processes"):
        dm.setup(SimpleNamespace(num_processes=4))
    assert dm.per_process_batch(2) == 2


def test_nccl_without_gpus_falls_back_to_gloo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert dist.resolve_backend("nccl") == "gloo"
    assert any("trainer.backend=nccl needs CUDA devices" in str(w.message) for w in caught)
    assert dist.resolve_backend("auto") == "gloo"
    assert dist.resolve_backend("gloo", cpu=True) == "gloo"
    with pytest.raises(ConfigError, match=r"^trainer\.backend=mpi is not known; use auto, nccl or gloo\.$"):
        check_config(compose_train(["trainer.backend=mpi"]))


@pytest.mark.slow
def test_unreachable_rendezvous_times_out_naming_the_address(monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()  # nobody listens there
    for key, value in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match=rf"could not reach the rendezvous at 127\.0\.0\.1:{port} for 1 s"):
        dist.init_distributed("gloo", cpu=True, rendezvous_timeout=1)
    assert not torch.distributed.is_initialized()


@pytest.mark.slow
def test_unreachable_rendezvous_from_the_cli_exits_2(tmp_path: Path) -> None:
    """No run_name: the error comes from the run-name resolver, before Hydra creates any folder."""
    port = free_port()
    env = env_for(tmp_path / "logs", RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", MASTER_ADDR="127.0.0.1",
                  MASTER_PORT=str(port))
    res = run(plain_cmd([*BASE, "trainer.rendezvous_timeout=2"]), env, timeout=120)
    assert res.returncode == 2, res.stderr[-3000:]
    lines = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0] and "trainer.rendezvous_timeout" in lines[0]
    assert not (tmp_path / "logs").exists()


def test_run_name_is_cached_per_config_and_rank_zero_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = compose_train([])
    first = cfg.run_name
    assert cfg.run_name == first  # the folder Hydra made and the name the task logs agree
    monkeypatch.setenv("RANK", "3")
    assert dist.rank_zero_value(".hydra") is None
    monkeypatch.setenv("RANK", "0")
    assert dist.rank_zero_value("a", "b") == "a"

