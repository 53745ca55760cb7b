"""`python -m segplat.prepare`: prepares with a summary, verifies on re-run, resumes after a crash,
never lets a half-written store read as complete; `python -m segplat.data.fake` writes every layout."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from segplat.data import store as store_module
from segplat.data.datamodule import DataModule
from segplat.data.fake import WRITERS, writer
from segplat.data.fake import main as fake_main
from segplat.data.fake.clouds import write_fake
from segplat.data.layouts.base import SampleRef
from segplat.data.layouts.clouds import CloudsLayout
from segplat.data.store import PatchStore, is_complete, prepare_store
from segplat.errors import ConfigError, DataError
from segplat.schema import check_targets
from tests.conftest import REPO


def run_prepare(args: list[str], cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "SEGPLAT_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "segplat.prepare", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_cli_prepares_then_verifies(tmp_path: Path) -> None:
    root = tmp_path / "clouds"
    assert fake_main(["clouds", str(root)]) == 0
    (root / "train" / "ngr" / "train_0000.png").unlink()
    args = ["dataset=clouds", f"dataset.root={root}", "dataset.tile_size=64", "trainer.progress=false"]
    first = run_prepare(args, tmp_path / "cache")
    assert first.returncode == 0, first.stderr[-3000:]
    lines = first.stdout.strip().splitlines()
    assert lines[-1].startswith("store: ")
    path = Path(lines[-1].removeprefix("store: "))
    assert is_complete(path) and path.parent == tmp_path / "cache" / "stores"
    out = first.stdout
    store = PatchStore(path)
    for split in ("train", "val", "test"):
        n = sum(m is not None for m in store.tiles_meta(split))  # written tiles (a skipped sample leaves holes)
        assert any(line.split()[:1] == [split] and line.split()[-1] == str(n) for line in lines), out
    assert "skipped: 1" in out and "ngr/train_0000.png: the file is missing" in out
    assert "verified" not in out
    again = run_prepare(args, tmp_path / "cache")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "is complete and matches the config" in again.stdout and "verified" in again.stdout
    assert again.stdout.strip().splitlines()[-1] == f"store: {path}"
    missing = run_prepare(["dataset=clouds", f"dataset.root={tmp_path / 'nope'}"], tmp_path / "cache")
    assert missing.returncode == 2 and "is not a folder" in missing.stderr


class _Crashing(CloudsLayout):
    """Dies on the n-th read, as a killed prepare would; counts reads."""

    def __init__(self, root: str, crash_at: int | None) -> None:
        super().__init__(root, val_fraction=0.0)
        self.crash_at, self.reads = crash_at, 0

    def read(self, ref: SampleRef):
        self.reads += 1
        if self.crash_at is not None and self.reads == self.crash_at:
            raise KeyboardInterrupt
        return super().read(ref)


def test_resume_after_a_crash_reads_only_the_rest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = write_fake(tmp_path / "clouds", num_train=6, num_test=0)
    path = tmp_path / "s.zarr"
    with pytest.raises(KeyboardInterrupt):
        prepare_store(_Crashing(str(root), crash_at=4), path, 64, progress=False)
    assert not is_complete(path) and not path.exists()
    with pytest.raises(DataError, match="not a complete segplat store"):
        PatchStore(path)
    second = _Crashing(str(root), crash_at=None)
    prepare_store(second, path, 64, progress=False)
    assert second.reads == 6  # nothing was flushed before the crash (flushes come every 5 s) ...
    store = PatchStore(path)
    assert len({m["source"] for m in store.tiles_meta("train") if m}) == 6  # ... and nothing is lost
    # a crash after a flush: the flushed samples are not read again (here a flush before every sample)
    monkeypatch.setattr(store_module, "META_FLUSH_SECONDS", 0.0)
    big = write_fake(tmp_path / "big", num_train=20, num_test=0)
    path2 = tmp_path / "s2.zarr"
    with pytest.raises(KeyboardInterrupt):
        prepare_store(_Crashing(str(big), crash_at=19), path2, 64, progress=False)
    third = _Crashing(str(big), crash_at=None)
    prepare_store(third, path2, 64, progress=False)
    assert third.reads == 2  # the sample that crashed and the last one
    assert len({m["source"] for m in PatchStore(path2).tiles_meta("train") if m}) == 20


def test_fake_registry(tmp_path: Path) -> None:
    assert set(WRITERS) >= {"clouds", "sen1floods11", "vaihingen", "potsdam", "geotiff"}
    for name in ("clouds", "sen1floods11", "vaihingen", "potsdam", "geotiff"):
        assert callable(writer(name))
    with pytest.raises(ConfigError, match="no fake-data writer"):
        writer("nope")
    assert fake_main(["nope", str(tmp_path)]) == 2


@pytest.mark.parametrize("name", ["clouds", "sen1floods11", "vaihingen", "potsdam", "geotiff"])
def test_configs_declare_root_and_ignore_index(name: str) -> None:
    from tests.conftest import compose_train

    cfg = compose_train([f"dataset={name}"])
    assert cfg.dataset.requires_root is True and cfg.dataset.ignore_index == 255 and len(cfg.dataset.root_hint) > 20
    assert cfg.dataset.name == name


def _compose_prepare(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from tests.conftest import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="prepare", overrides=overrides)


TINY_STORE = ["dataset.layout.num_train=4", "dataset.layout.num_val=2", "dataset.layout.scene_size=64",
              "dataset.tile_size=32", "dataset.patch_size=32", "trainer.progress=false"]


def _damage(path: Path, how: str) -> str:
    """Damage tile 3 of train/rgb; returns the array name the error must mention."""
    chunk = path / "train" / "rgb" / "c" / "3" / "0" / "0" / "0"
    if how == "deleted":
        chunk.unlink()
    else:
        data = bytearray(chunk.read_bytes())
        data[100] ^= 0x5A  # same size, different bytes
        chunk.write_bytes(bytes(data))
    return "train/rgb tile 3"


@pytest.mark.parametrize("how", ["deleted", "flipped"])
def test_a_damaged_store_is_never_called_verified(tmp_path: Path, how: str, capsys: pytest.CaptureFixture) -> None:
    from segplat.data.datamodule import DataModule
    from segplat.prepare import prepare, print_summary

    store_dir = tmp_path / "stores"
    cfg = _compose_prepare([*TINY_STORE, f"dataset.store_dir={store_dir}"])
    path, summary = prepare(cfg)
    assert summary["verified"] is None
    path, summary = prepare(cfg)
    print_summary(Path(path), summary)
    assert "verified (every chunk present, every checksum and label value checked)" in capsys.readouterr().out
    where = _damage(Path(path), how)
    quick = _compose_prepare([*TINY_STORE, f"dataset.store_dir={store_dir}", "verify=quick"])
    if how == "deleted":  # presence is checked even by the quick verification
        with pytest.raises(DataError, match=f"is damaged: store .*{where} has no chunk"):
            prepare(quick)
    else:  # same-size bytes: only checksums see them
        assert prepare(quick)[1]["verified"] == "quick"
    with pytest.raises(DataError, match=f"is damaged: store .*{where} .*(no chunk|checksum does not match)"):
        prepare(cfg)
    # training checks a local store once per machine: the recorded result stops it before the first epoch
    dm = instantiate_dm(cfg.dataset)
    with pytest.raises(DataError, match=f"store {path} is damaged: .*{where}"):
        dm.setup()
    # with the checks switched off, a missing chunk still stops the read, naming the store, array and tile
    off = DataModule(**{**_plain(cfg.dataset), "verify": "off"})
    off.setup()
    ds = off.dataset("train", train=False)
    if how == "deleted":
        with pytest.raises(DataError, match=f"store {path}: {where} has no chunk"):
            [ds[i] for i in range(len(ds))]
    # force=true rebuilds it, and the rebuilt store is clean
    forced = _compose_prepare([*TINY_STORE, f"dataset.store_dir={store_dir}", "force=true"])
    assert prepare(forced)[1]["verified"] is None
    assert prepare(cfg)[1]["verified"] == "deep"
    instantiate_dm(cfg.dataset).setup()


def _plain(dataset_cfg) -> dict:
    from omegaconf import OmegaConf

    out = OmegaConf.to_container(dataset_cfg, resolve=True)
    out.pop("_target_")
    out.pop("_recursive_", None)
    return out


def instantiate_dm(dataset_cfg):
    from hydra.utils import instantiate

    return instantiate(dataset_cfg)


@pytest.mark.slow
def test_files_changed_under_the_root_give_a_new_store_never_a_stale_one(tmp_path: Path) -> None:
    """Rewriting, adding or removing a source file changes the fingerprint, so training re-prepares."""
    import shutil

    import cv2
    import numpy as np

    from tests.data.conftest import prepared

    root = tmp_path / "clouds"
    write_fake(root)
    _, first = prepared("clouds", root)
    _, same = prepared("clouds", root)
    assert same.location.uri == first.location.uri  # nothing changed: the store is reused
    label = sorted((root / "train" / "label").glob("*.png"))[0]
    image = cv2.imread(str(label))
    image[...] = (0, 0, 255)  # every pixel thick cloud (BGR red), the same file name
    cv2.imwrite(str(label), image)
    _, rewritten = prepared("clouds", root)
    assert rewritten.location.uri != first.location.uri
    split, tile = next((s, i) for s in ("train", "val") for i, m in enumerate(rewritten.tiles_meta(s))
                       if m and Path(m["source"]).name == label.name)
    new, old = (np.asarray(st.reader(split, "label")[tile]) for st in (rewritten, first))
    assert not np.array_equal(new, old)  # the new store holds the rewritten labels
    for sub in ("rgb", "ngr", "label"):  # a sample removed
        victim = sorted((root / "train" / sub).glob("*.png"))[-1]
        shutil.move(victim, tmp_path / f"{sub}_{victim.name}")
    _, removed = prepared("clouds", root)
    assert removed.location.uri not in (first.location.uri, rewritten.location.uri)


@pytest.mark.slow
def test_two_nodes_sharing_a_store_folder_prepare_it_once(tmp_path: Path) -> None:
    """Each node's first process prepares a local store; on a shared file system two nodes meet in one folder. The
    lock beside the store lets one prepare (slowed to 2 s) while the other waits, then finds it complete."""
    count = tmp_path / "prepares.txt"
    env = {**os.environ, "SEGPLAT_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-m", "tests.data.node_preparer", str(tmp_path / "stores"), str(count),
                               str(rank)], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for rank in (0, 1)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    assert len(count.read_text().split()) == 1  # prepared once, by whichever node took the lock first
    builds = {out.strip().splitlines()[-1] for out, _ in outs}
    assert len(builds) == 1  # both nodes read the same store
    stores = [p for p in (tmp_path / "stores").iterdir() if p.suffix == ".zarr"]
    assert len(stores) == 1 and is_complete(stores[0], stores[0].name.rsplit("-", 1)[1].removesuffix(".zarr"))


@pytest.mark.parametrize("value", [2, -0.5])
def test_class_balanced_outside_a_probability_is_refused(value: float) -> None:
    """It is compared with a uniform draw, so 2 acted as 1 and -0.5 as 0 without a word."""
    node = {"_target_": "segplat.data.DataModule", "name": "x", "layout": {}, "class_balanced": value}
    with pytest.raises(ConfigError, match=rf"^dataset\.class_balanced={value:g} must be a number from 0 to 1; the "
                                          r"probability .* 0 = off, 1 = always\.$"):
        check_targets(node, root="dataset")
    assert DataModule(name="x", layout={}, requires_root=False, class_balanced=1.0).class_balanced == 1.0
