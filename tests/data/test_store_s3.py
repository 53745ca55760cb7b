"""Stores on an S3 endpoint (a real SeaweedFS server on 127.0.0.1 that requires credentials, real clients): prepare
writes them, training reads them with loader workers and a local cache, an interrupted prepare resumes, a store
without its marker is never complete, a missing bucket / wrong endpoint / refused credentials stop in one sentence
before any work, and two torchrun processes share one remote store with one preparer."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import numpy as np
import pytest

from segplat.data import store as store_module
from segplat.data.chunk_reader import CachedObjects, RemoteObjects, TileReader
from segplat.data.dataset import PatchDataset
from segplat.data.store import COMPLETE_MARKER, PatchStore, is_complete, prepare_store, verify_store
from segplat.data.store_location import StoreLocation, check_access
from segplat.data.synthetic import SyntheticClouds
from segplat.errors import ConfigError, DataError
from segplat.schema import check_targets
from tests.conftest import TINY
from tests.data.s3_server import S3Server, s3_env_fixture, s3_server_fixture  # noqa: F401  (fixtures)
from tests.distributed.launch_utils import BASE, env_for, run, summary, torchrun_cmd

ARRAYS = ("rgb", "nir", "label", "valid")


def _layout(num_train: int = 6, num_val: int = 2) -> SyntheticClouds:
    return SyntheticClouds(num_train=num_train, num_val=num_val, scene_size=64, seed=3)


def _same_stores(a: PatchStore, b: PatchStore) -> None:
    assert a.meta["stats"] == b.meta["stats"]
    for split in ("train", "val"):
        assert a.tiles_meta(split) == b.tiles_meta(split)
        for name in ARRAYS:
            np.testing.assert_array_equal(np.asarray(a.split(split)[name][:]), np.asarray(b.split(split)[name][:]))


@pytest.mark.parametrize("client", ["fsspec", "obstore"])
@pytest.mark.slow
def test_prepare_to_s3_reads_like_a_local_store(s3_env: S3Server, tmp_path: Path, client: str) -> None:
    uri = s3_env.uri("syn")
    location = StoreLocation.parse(uri, client)
    assert prepare_store(_layout(), location, 32, tiles_per_shard=4, progress=False) == uri
    keys = s3_env.keys(location.prefix + "/")
    assert f"{location.prefix}/{COMPLETE_MARKER}" in keys
    # 6 train scenes of 64 px = 24 tiles of 32 px -> 6 shards per array, not 24 objects
    assert sum(k.startswith(f"{location.prefix}/train/rgb/c/") for k in keys) == 6
    local = PatchStore(prepare_store(_layout(), tmp_path / "local.zarr", 32, tiles_per_shard=4, progress=False))
    remote = PatchStore(location)
    _same_stores(remote, local)
    assert isinstance(remote.object_source(), RemoteObjects)
    reader = remote.reader("train", "rgb")
    assert isinstance(reader, TileReader)
    np.testing.assert_array_equal(reader[5, :, 3:20, 7:30], np.asarray(local.split("train")["rgb"][5, :, 3:20, 7:30]))
    assert verify_store(remote, deep=True) == []


@pytest.mark.slow
def test_cached_reads_equal_remote_reads_and_fill_the_cache_once(s3_env: S3Server, tmp_path: Path) -> None:
    uri = s3_env.uri("syn")
    prepare_store(_layout(), uri, 32, tiles_per_shard=8, progress=False)
    cached = PatchStore(StoreLocation.parse(uri, cache_dir=str(tmp_path / "cache")))
    source = cached.object_source()
    assert isinstance(source, CachedObjects)
    plain = PatchDataset(uri, "train", 16, train=True, patches_per_tile=2)
    through_cache = PatchDataset(cached.location, "train", 16, train=True, patches_per_tile=2)
    for i in range(len(plain)):
        a, b = plain[i], through_cache[i]
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    files = sorted(p.relative_to(source.cache.root).as_posix() for p in source.cache.root.rglob("*") if p.is_file())
    chunks = [f for f in files if not f.endswith("zarr.json")]
    assert chunks == [f"train/{name}/c/{s}/0/0" + ("/0" if name in ("rgb", "nir") else "")
                      for name in ("label", "nir", "rgb") for s in range(3)]  # whole shards, each fetched once
    # the metadata documents too: a warm open asks the endpoint for the completion marker only
    assert {"zarr.json", "train/zarr.json", "train/rgb/zarr.json", "train/label/zarr.json"} <= set(files)


@pytest.mark.slow
def test_interrupted_prepare_on_s3_resumes_without_rewriting(s3_env: S3Server, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    class Crashing(SyntheticClouds):
        def __init__(self, crash_at: int | None) -> None:
            super().__init__(num_train=12, num_val=2, scene_size=64, seed=3)
            self.crash_at, self.reads = crash_at, 0

        def read(self, ref):
            self.reads += 1
            if self.crash_at is not None and self.reads == self.crash_at:
                raise KeyboardInterrupt
            return super().read(ref)

    monkeypatch.setattr(store_module, "META_FLUSH_SECONDS", 0.0)  # the tile table is saved before every sample
    uri = s3_env.uri("syn")
    location = StoreLocation.parse(uri)
    with pytest.raises(KeyboardInterrupt):
        prepare_store(Crashing(crash_at=10), location, 32, tiles_per_shard=8, progress=False)
    assert not is_complete(location)
    with pytest.raises(DataError, match="not a complete segplat store"):
        PatchStore(location)
    # 4 tiles per sample, 8 per shard: samples 0-7 filled shards 0-3, written whole; sample 8 sat in the buffer
    written = {k: o["LastModified"] for k, o in _objects(s3_env, location.prefix + "/train/rgb/c/").items()}
    assert sorted(written) == [f"{location.prefix}/train/rgb/c/{s}/0/0/0" for s in range(4)]
    time.sleep(1.1)  # LastModified has a resolution of one second: a rewrite below would show a later one
    resumed = Crashing(crash_at=None)
    prepare_store(resumed, location, 32, tiles_per_shard=8, progress=False)
    assert resumed.reads == 12 - 8 + 2  # train samples 8-11 (8 crashed), plus the 2 val samples
    after = _objects(s3_env, location.prefix + "/train/rgb/c/")
    for key, modified in written.items():  # tiles of finished shards were not written again
        assert after[key]["LastModified"] == modified
    assert is_complete(location)
    clean = PatchStore(prepare_store(_layout(12, 2), tmp_path / "clean.zarr", 32, tiles_per_shard=8, progress=False))
    _same_stores(PatchStore(location), clean)


def _objects(server: S3Server, prefix: str) -> dict[str, dict]:
    pages = server.client().get_paginator("list_objects_v2").paginate(Bucket=server.bucket, Prefix=prefix)
    return {o["Key"]: o for page in pages for o in page.get("Contents", [])}


@pytest.mark.slow
def test_a_store_without_its_marker_is_never_complete(s3_env: S3Server) -> None:
    uri = s3_env.uri("syn")
    location = StoreLocation.parse(uri)
    prepare_store(_layout(), location, 32, progress=False)
    s3_env.client().delete_object(Bucket=s3_env.bucket, Key=f"{location.prefix}/{COMPLETE_MARKER}")
    assert not is_complete(location)
    with pytest.raises(DataError, match=f"{uri} is not a complete segplat store"):
        PatchStore(location)
    with pytest.raises(DataError, match="not a complete"):
        PatchDataset(uri, "train", 16)


def _dm(uri: str, **kw):
    from segplat.data.datamodule import DataModule

    layout = {"_target_": "segplat.data.synthetic.SyntheticClouds", "num_train": 4, "num_val": 2, "scene_size": 64}
    return DataModule(name="synthetic", layout=layout, requires_root=False, store_uri=uri, tile_size=32,
                      patch_size=16, batch_size=2, num_workers=0, progress=False, **kw)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("client", ["fsspec", "obstore"])
@pytest.mark.slow
def test_access_errors_are_one_sentence_before_any_work(s3_env: S3Server, monkeypatch: pytest.MonkeyPatch,
                                                        client: str) -> None:
    cases = {
        "missing bucket": ({}, "s3://no-such-bucket/x/syn.zarr", r"the bucket 'no-such-bucket' of .* does not exist"),
        "wrong endpoint": ({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{_closed_port()}"}, None,
                           r"the S3 endpoint http://127\.0\.0\.1:\d+ cannot be reached"),
        "bad credentials": ({"AWS_SECRET_ACCESS_KEY": "not-the-secret"}, None,
                            r"the S3 credentials were refused \((SignatureDoesNotMatch|InvalidAccessKeyId)\)"),
        "unknown key": ({"AWS_ACCESS_KEY_ID": "AKIAUNKNOWN000000000"}, None, r"the S3 credentials were refused"),
    }
    for name, (env, uri, message) in cases.items():
        with monkeypatch.context() as m:
            for key, value in env.items():
                m.setenv(key, value)
            dm = _dm(uri or s3_env.uri("syn"), store_client=client)
            with pytest.raises(DataError, match=message) as err:
                dm.setup()
            text = str(err.value)
            assert "\n" not in text and text.endswith(".") and "not-the-secret" not in text, name
            assert s3_env.secret not in text and dm.store is None, name


@pytest.mark.slow
def test_obstore_loader_workers_start_by_forkserver(s3_env: S3Server) -> None:
    """obstore's runtime does not survive a fork, and the main process has used it: workers must not be forked."""
    dm = _dm(s3_env.uri("syn"), store_client="obstore")
    dm.num_workers = 2
    dm.setup()
    loader = dm.train_loader()
    assert loader.multiprocessing_context.get_start_method() == "forkserver"
    batches = list(loader)
    assert sum(len(b["tile"]) for b in batches) == len(loader.dataset) // 2 * 2


def test_uris_with_credentials_or_other_schemes_are_refused() -> None:
    with pytest.raises(ConfigError, match="must not carry credentials"):
        StoreLocation.parse("s3://AKIA:secret@bucket-a/x.zarr")
    with pytest.raises(ConfigError, match="gs://, which segplat does not read"):
        StoreLocation.parse("gs://bucket-a/x.zarr")
    with pytest.raises(ConfigError, match="names a whole bucket"):
        StoreLocation.parse("s3://bucket-a")
    node = {"_target_": "segplat.data.DataModule", "name": "x", "layout": {}, "store_client": "boto"}
    with pytest.raises(ConfigError, match=r"^dataset\.store_client=boto is not known; use fsspec or obstore; "):
        check_targets(node, root="dataset")
    with pytest.raises(ConfigError, match="caches remote stores only"):
        _dm(None, cache_dir="/tmp/cache")


@pytest.mark.slow  # over a second: in the full run, not the local loop
def test_check_access_passes_for_a_good_endpoint(s3_env: S3Server) -> None:
    check_access(StoreLocation.parse(s3_env.uri("any")))
    check_access(StoreLocation.parse(s3_env.uri("any"), "obstore"))


@pytest.mark.slow
def test_prepare_cli_then_train_one_epoch_from_s3_with_two_workers(s3_server: S3Server, tmp_path: Path) -> None:
    uri = s3_server.uri("syn")
    cache = tmp_path / "chunk-cache"
    store = [f"dataset.store_uri={uri}", "dataset.tiles_per_shard=4", f"dataset.cache_dir={cache}",
             "dataset.layout.num_train=8", "dataset.layout.num_val=4", "dataset.layout.scene_size=64",
             "dataset.tile_size=64"]
    env = env_for(tmp_path / "logs", SEGPLAT_CACHE=str(tmp_path / "segplat"), **s3_server.env())
    import subprocess
    import sys

    from tests.conftest import REPO

    prepared = subprocess.run([sys.executable, "-m", "segplat.prepare", *store, "trainer.progress=false"], env=env,
                              cwd=REPO, capture_output=True, text=True, timeout=300)
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    assert prepared.stdout.strip().splitlines()[-1] == f"store: {uri}"
    again = subprocess.run([sys.executable, "-m", "segplat.prepare", *store, "trainer.progress=false"], env=env,
                           cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "verified (every chunk present, every checksum" in again.stdout, again.stderr
    overrides = [*TINY, *store, "dataset.num_workers=2", "trainer.max_epochs=1", "run_name=s3"]
    trained = run([sys.executable, "-m", "segplat.train", *overrides], env, timeout=400)
    assert trained.returncode == 0, trained.stderr[-3000:]
    run_dir = tmp_path / "logs" / "train" / "runs" / "s3"
    assert summary(run_dir)["status"] == "completed"
    assert any(cache.rglob("c/*")), "the read-through cache was not used"
    for path in run_dir.rglob("*"):  # credentials never reach the run folder or checkpoints
        if path.is_file():
            data = path.read_bytes()
            assert s3_server.secret.encode() not in data and s3_server.key.encode() not in data, path


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_two_processes_read_one_remote_store_with_one_preparer(s3_env: S3Server, tmp_path: Path) -> None:
    s3_server = s3_env
    uri = s3_server.uri("syn")
    overrides = [*BASE, f"dataset.store_uri={uri}", "dataset.tiles_per_shard=4",
                 f"dataset.cache_dir={tmp_path / 'cache'}", "trainer.max_epochs=1", "run_name=ddp_s3"]
    env = env_for(tmp_path / "logs", SEGPLAT_CACHE=str(tmp_path / "segplat"), **s3_server.env())
    out = run(torchrun_cmd(overrides, nproc=2), env, timeout=400)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    log = out.stdout + out.stderr
    assert log.count("prepared s3://") == 1, log[-4000:]  # one preparer
    assert summary(tmp_path / "logs" / "train" / "runs" / "ddp_s3")["status"] == "completed"
    assert is_complete(StoreLocation.parse(uri))
