"""A checkpoint is untrusted input: loading one for prediction, evaluation, resume or as pretrained
weights never calls, imports or writes anything the file names (issue: checkpoint config executed)."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

import segplat
from segplat.engine.checkpoint import inference_config, load_checkpoint, trusted_targets
from segplat.errors import CheckpointError, ConfigError
from segplat.inference import load_for_inference
from segplat.models.weights import load_state_file
from segplat.train import train
from tests.conftest import TINY, compose_train
from tests.user_project import USER_CONF, on_path

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("run")
    quick = ["trainer.max_epochs=1", "callbacks.visuals=null", "callbacks.report=null"]
    train(compose_train([*TINY, *quick], output_dir=run))
    return run


@pytest.fixture(scope="module")
def clean_state(trained_run: Path) -> dict:
    return load_checkpoint(trained_run / "checkpoints" / "best.ckpt")


def crafted(state: dict, folder: Path, edit) -> Path:
    """A copy of a real checkpoint whose stored config was changed by `edit(cfg_dict)`."""
    cfg = yaml.safe_load(state["config"])
    edit(cfg)
    path = folder / "crafted.ckpt"
    torch.save({**state, "config": yaml.safe_dump(cfg)}, path)
    return path


def foreign_targets(victim: Path, module_dir: Path) -> dict[str, dict]:
    """Callables a malicious config might name, each aimed at writing or importing something observable."""
    return {
        "builtins.open": {"_target_": "builtins.open", "file": str(victim), "mode": "w"},
        "pathlib.Path.write_text": {"_target_": "pathlib.Path.write_text", "_args_": [str(victim), "owned"]},
        "shutil.copyfile": {"_target_": "shutil.copyfile", "src": __file__, "dst": str(victim)},
        "torch.save": {"_target_": "torch.save", "obj": 1, "f": str(victim)},
        "importlib.import_module": {"_target_": "importlib.import_module", "name": "segplat_evil_probe"},
        # a module on sys.path whose import alone writes the victim: resolving the target would import it
        "evil module": {"_target_": "segplat_evil_probe.anything"},
        # an attribute chain through a trusted module reaching an untrusted callable
        "attribute chain": {"_target_": "segplat.models.segmenter.torch.save", "obj": 1, "f": str(victim)},
    }


@pytest.fixture()
def evil_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    victim = tmp_path / "victim.txt"
    module_dir = tmp_path / "mods"
    module_dir.mkdir()
    (module_dir / "segplat_evil_probe.py").write_text(f"open({str(victim)!r}, 'w').write('imported')\n")
    monkeypatch.syspath_prepend(str(module_dir))
    sys.modules.pop("segplat_evil_probe", None)
    return victim, module_dir


PLACES = {
    "model._target_": lambda cfg, node: cfg.__setitem__("model", {**node, **{k: v for k, v in cfg["model"].items()
                                                                             if k != "_target_"}}),
    "model.encoder": lambda cfg, node: cfg["model"].__setitem__("encoder", node),
    "model.decoder.channels[0]": lambda cfg, node: cfg["model"]["decoder"].__setitem__("channels", [node, 16, 16, 16]),
    "model.fusion.deep": lambda cfg, node: cfg["model"]["fusion"].__setitem__("extra", {"deeper": {"x": node}}),
    "dataset.layout": lambda cfg, node: cfg["dataset"].__setitem__("layout", node),
}


@pytest.mark.parametrize("place", list(PLACES))
@pytest.mark.parametrize("target", ["builtins.open", "pathlib.Path.write_text", "shutil.copyfile", "torch.save",
                                    "importlib.import_module", "evil module", "attribute chain"])
def test_foreign_target_anywhere_is_refused_and_nothing_runs(clean_state, tmp_path, evil_module, place, target):
    victim, module_dir = evil_module
    node = foreign_targets(victim, module_dir)[target]
    ckpt = crafted(clean_state, tmp_path, lambda cfg: PLACES[place](cfg, node))
    with pytest.raises(CheckpointError, match=r"_target_=") as err:
        load_for_inference(ckpt)
    assert "refusing to build" in str(err.value)
    assert place.split("[")[0].split(".")[0] in str(err.value)
    assert not victim.exists(), "a crafted checkpoint wrote a file"
    assert "segplat_evil_probe" not in sys.modules, "a crafted checkpoint imported a module"


def test_other_hydra_keys_and_interpolations_are_refused(clean_state, tmp_path):
    ckpt = crafted(clean_state, tmp_path, lambda cfg: cfg["model"].__setitem__("head_dropout", "${oc.env:HOME}"))
    with pytest.raises(CheckpointError, match=r"interpolation at model.head_dropout"):
        load_for_inference(ckpt)
    ckpt = crafted(clean_state, tmp_path, lambda cfg: cfg["model"]["encoder"].__setitem__("_set_", 1))
    with pytest.raises(CheckpointError, match=r"Hydra key model.encoder._set_"):
        load_for_inference(ckpt)


def test_value_tables_with_number_keys_are_data_not_refused(clean_state, tmp_path):
    """airquality's `mask_values: {90: 0, 10: 1}` (and geotiff's value_map) reach the checkpoint with int keys:
    a number is never a Hydra key, so the table is plain data and its keys stay numbers."""
    table = {90: 0, 10: 1}
    ckpt = crafted(clean_state, tmp_path, lambda cfg: cfg["dataset"].__setitem__(
        "layout", {"_target_": "segplat.data.layouts.airquality.AirQualityLayout", "mask_values": table}))
    cfg = inference_config(load_checkpoint(ckpt), ckpt)
    assert dict(cfg.dataset.layout.mask_values) == table
    load_for_inference(ckpt)
    nested = {90: {"_target_": "builtins.open", "file": str(tmp_path / "victim"), "mode": "w"}}
    ckpt = crafted(clean_state, tmp_path, lambda cfg: cfg["dataset"].__setitem__("layout", {"mask_values": nested}))
    with pytest.raises(CheckpointError, match=r"names dataset.layout.mask_values.90._target_='builtins.open'"):
        load_for_inference(ckpt)


class WritesOnUnpickle:
    def __init__(self, victim: Path) -> None:
        self.victim = victim

    def __reduce__(self):
        return (Path.write_text, (self.victim, "owned"))


@pytest.mark.parametrize("zipfile", [True, False], ids=["zip", "legacy"])
def test_pickles_with_reduce_never_run(clean_state, trained_run, tmp_path, zipfile):
    victim = tmp_path / "victim.txt"
    bad = tmp_path / "bad.ckpt"
    torch.save({**clean_state, "extra": WritesOnUnpickle(victim)}, bad, _use_new_zipfile_serialization=zipfile)
    # prediction / evaluation
    with pytest.raises(CheckpointError, match=r"Python object \(getattr\).*never unpickles code"):
        load_for_inference(bad)
    # pretrained weights
    with pytest.raises(CheckpointError, match=r"Python object \(getattr\).*never unpickled"):
        load_state_file(bad)
    # resume
    run = tmp_path / "resumed"
    with pytest.raises(CheckpointError, match="never unpickles code"):
        train(compose_train([*TINY, "trainer.max_epochs=2", f"trainer.resume={bad}"], output_dir=run))
    assert not victim.exists()


def test_a_plain_pickle_is_refused_too(tmp_path):
    victim = tmp_path / "victim.txt"
    bad = tmp_path / "plain.pkl"
    bad.write_bytes(pickle.dumps(WritesOnUnpickle(victim)))
    with pytest.raises(CheckpointError):
        load_for_inference(bad)
    assert not victim.exists()


def test_pretrained_paths_and_store_locations_never_come_from_a_checkpoint(clean_state, tmp_path):
    def edit(cfg):
        cfg["model"]["encoder"]["pretrained"] = str(tmp_path / "not-here.safetensors")
        cfg["dataset"]["store_path"] = str(tmp_path / "elsewhere.zarr")
        cfg["dataset"]["store_dir"] = str(tmp_path / "elsewhere")
        cfg["dataset"]["store_uri"] = "s3://someone-elses-bucket/x.zarr"
        cfg["dataset"]["cache_dir"] = str(tmp_path / "cache")

    ckpt = crafted(clean_state, tmp_path, edit)
    loaded = load_for_inference(ckpt)  # the missing pretrained file is not opened: the checkpoint's weights count
    assert loaded.config.model.encoder.pretrained is None
    assert not {"store_path", "store_dir", "store_uri", "cache_dir"} & set(loaded.config.dataset)
    assert set(loaded.config) == {"model", "dataset"}


def test_shipped_presets_are_trusted_and_nothing_else():
    trusted = trusted_targets()
    assert "segplat.models.Segmenter" in trusted and "segplat.models.cmx.CMX" in trusted
    assert "segplat.data.DataModule" in trusted and "segplat.data.layouts.clouds.CloudsLayout" in trusted
    assert not any(t.startswith(("builtins", "os.", "torch.", "pathlib", "shutil")) for t in trusted)
    # the losses, optimisers and callbacks are never built from a checkpoint
    assert "segplat.engine.Trainer" not in trusted and "segplat.optim.build_optimizer" not in trusted


def test_checked_config_of_a_real_run_is_unchanged(clean_state, trained_run):
    cfg = inference_config(clean_state, "best.ckpt")
    stored = yaml.safe_load(clean_state["config"])
    assert cfg.model._target_ == stored["model"]["_target_"]
    assert cfg.dataset.layout._target_ == stored["dataset"]["layout"]["_target_"]


def test_run_folder_with_a_checkpoint_of_another_run_is_refused(clean_state, trained_run, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text((trained_run / "config.yaml").read_text().replace(
        "_target_: segplat.models.Segmenter", "_target_: segplat.models.cmx.CMX", 1))
    torch.save(clean_state, run / "checkpoints" / "best.ckpt")
    with pytest.raises(CheckpointError, match="belongs to another run"):
        load_for_inference(run)
    load_for_inference(run / "checkpoints" / "best.ckpt")  # the file itself is accepted


@pytest.mark.slow
def test_predict_cli_refuses_a_crafted_checkpoint_in_one_line(clean_state, tmp_path):
    victim = tmp_path / "victim.txt"
    ckpt = crafted(clean_state, tmp_path, lambda cfg: cfg["model"].__setitem__(
        "decoder", {"_target_": "pathlib.Path.write_text", "_args_": [str(victim), "owned"]}))
    proc = subprocess.run([sys.executable, "-m", "segplat.predict", f"ckpt={ckpt}", f"input={tmp_path}",
                           f"hydra.run.dir={tmp_path / 'out'}"], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ}, timeout=300)
    assert proc.returncode == 2, proc.stderr
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "model.decoder._target_='pathlib.Path.write_text'" in error_lines[0]
    assert "Traceback" not in proc.stderr
    assert not victim.exists()


# -- a user's own project: its configs on the search path are what makes its targets buildable ------------------
def user_model_checkpoint(clean_state: dict, folder: Path) -> Path:
    """A real checkpoint of the user's plain TinyNet (tests/user_project) on the synthetic data's facts."""
    from segplat.models.build import build_model

    cfg = yaml.safe_load(clean_state["config"])
    cfg["model"] = {"_target_": "tinyproj.model.TinyNet", "width": 6}
    modalities = {m: len(s["bands"]) for m, s in clean_state["data"]["modalities"].items()}
    model = build_model(OmegaConf.create(cfg["model"]), modalities, len(clean_state["data"]["classes"]))
    path = folder / "user.ckpt"
    torch.save({**clean_state, "model": model.state_dict(), "config": yaml.safe_dump(cfg)}, path)
    return path


def test_a_user_projects_targets_are_trusted_only_from_its_config_folders():
    trusted = trusted_targets([USER_CONF])
    assert {"tinyproj.model.TinyNet", "tinyproj.layout.TinyLayout", "tinyproj.fusion.MaxFusion"} <= trusted
    assert trusted_targets() < trusted and "tinyproj.model.TinyNet" not in trusted_targets()
    # a tracker and a loss term are never built from a checkpoint, the user's no more than segplat's
    assert "tinyproj.tracker.CsvTracker" not in trusted and "tinyproj.losses.SoftJaccard" not in trusted


def test_a_user_model_checkpoint_loads_with_the_users_configs(clean_state, tmp_path, monkeypatch):
    on_path(monkeypatch)
    ckpt = user_model_checkpoint(clean_state, tmp_path)
    loaded = load_for_inference(ckpt, searchpath=[f"file://{USER_CONF}"])
    assert type(loaded.model.net).__module__ == "tinyproj.model" and loaded.model.net.head.in_channels == 6
    inputs = {"rgb": torch.randn(1, 3, 32, 32), "nir": torch.randn(1, 1, 32, 32)}
    assert loaded.model(inputs)["out"].shape == (1, 4, 32, 32)


def test_a_user_model_checkpoint_without_the_users_configs_is_refused_and_nothing_imported(clean_state, tmp_path,
                                                                                            monkeypatch):
    on_path(monkeypatch)
    ckpt = user_model_checkpoint(clean_state, tmp_path)
    for name in [m for m in sys.modules if m.startswith("tinyproj")]:
        monkeypatch.delitem(sys.modules, name)
    other = tmp_path / "other_conf" / "model"  # a config folder that does not name the user's model
    other.mkdir(parents=True)
    (other / "mine.yaml").write_text("_target_: tinyproj.model.Bigger\n")
    for searchpath in ([], [str(other.parent)]):
        with pytest.raises(CheckpointError, match=r"names model\._target_='tinyproj\.model\.TinyNet', which no model, "
                           r"fusion or dataset config on this machine's search path names; refusing to build from "
                           r"it \(if it is your own, give this command the folder of your configs: "
                           r"hydra\.searchpath=\[file://DIR\]"):
            load_for_inference(ckpt, searchpath=searchpath)
        assert not any(m.startswith("tinyproj") for m in sys.modules), "a refused checkpoint imported the user's code"
    # a crafted checkpoint naming a foreign callable stays refused with the user's configs given, too
    evil = crafted(clean_state, tmp_path, lambda cfg: cfg["model"].__setitem__(
        "decoder", {"_target_": "pathlib.Path.write_text", "_args_": [str(tmp_path / "victim"), "owned"]}))
    with pytest.raises(CheckpointError, match=r"model\.decoder\._target_='pathlib\.Path\.write_text'"):
        load_for_inference(evil, searchpath=[USER_CONF])
    assert not (tmp_path / "victim").exists()


def test_a_search_path_folder_that_does_not_exist_is_refused(trained_run):
    with pytest.raises(ConfigError, match=r"^hydra\.searchpath entry file://nowhere names .*/nowhere, which is not a "
                                          r"folder; give the folder that holds your model/, dataset/"):
        trusted_targets(["file://nowhere"])
    with pytest.raises(ConfigError, match=r"^searchpath entry file://.*/nowhere names .*/nowhere, which is not a "):
        segplat.load_model(trained_run, searchpath=["nowhere"])
