"""The read-through cache: whole objects fetched once even by several processes at once, installed atomically,
bounded in size (least recently used evicted first), and refused when their check fails."""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from pathlib import Path

import pytest

from segplat.data.chunk_cache import ReadThroughCache, touch
from segplat.errors import DataError

OBJECT_BYTES = 64 * 1024


class _Origin:
    """A slow object store stand-in for the cache's fetch callback: files in a folder, each fetch logged."""

    def __init__(self, folder: Path, log: Path) -> None:
        self.folder, self.log = folder, log

    def __call__(self, key: str) -> bytes | None:
        path = self.folder / key
        if not path.is_file():
            return None
        with open(self.log, "a") as fh:
            fh.write(f"{key}\n")
        time.sleep(0.01)  # a request's latency: concurrent misses of one key overlap
        return path.read_bytes()


def _origin(tmp_path: Path, n: int) -> _Origin:
    folder = tmp_path / "origin"
    for i in range(n):
        (folder / "train" / "rgb" / "c" / str(i)).parent.mkdir(parents=True, exist_ok=True)
        (folder / "train" / "rgb" / "c" / str(i)).write_bytes(bytes([i]) * OBJECT_BYTES)
    return _Origin(folder, tmp_path / "fetches.log")


def _read_all(cache_dir: str, origin: _Origin, n: int, max_bytes: int, seed: int) -> list[bool]:
    cache = ReadThroughCache(cache_dir, "s3://b/p/s.zarr", "build1", max_bytes, origin)
    order = list(range(n))
    import random

    random.Random(seed).shuffle(order)
    ok = []
    for i in order:
        path = cache.file(f"train/rgb/c/{i}")
        ok.append(path is not None and path.read_bytes() == bytes([i]) * OBJECT_BYTES)
    return ok


def test_several_processes_fetch_each_object_once(tmp_path: Path) -> None:
    n = 12
    origin = _origin(tmp_path, n)
    ctx = mp.get_context("fork")
    with ctx.Pool(4) as pool:
        results = pool.starmap(_read_all, [(str(tmp_path / "cache"), origin, n, 1 << 30, s) for s in range(4)])
    assert all(all(r) for r in results)
    fetched = origin.log.read_text().split()
    assert sorted(fetched) == sorted(f"train/rgb/c/{i}" for i in range(n))  # no object fetched twice
    cache = ReadThroughCache(tmp_path / "cache", "s3://b/p/s.zarr", "build1", 1 << 30, origin)
    assert cache.size() == n * OBJECT_BYTES
    assert not list((tmp_path / "cache").rglob("*.part"))  # only whole objects are ever visible


def test_the_cache_stays_within_its_bound_and_evicts_the_least_recently_used(tmp_path: Path) -> None:
    n = 20
    origin = _origin(tmp_path, n)
    bound = 6 * OBJECT_BYTES
    cache = ReadThroughCache(tmp_path / "cache", "s3://b/p/s.zarr", "build1", bound, origin)
    for i in range(n):
        cache.file(f"train/rgb/c/{i}")
        assert cache.size() <= bound + cache._scan_every + OBJECT_BYTES
    cache.evict()
    assert cache.size() <= bound
    kept = sorted(int(p.name) for p in cache.root.rglob("*") if p.is_file())
    assert kept == list(range(n - len(kept), n))  # the newest survive
    oldest = cache.root / "train" / "rgb" / "c" / str(kept[0])
    past = time.time() + 5
    os.utime(oldest, (past, past))  # used again (as a reader's touch does): it must now outlive the others
    for i in range(n):  # refill: everything else is older
        cache.file(f"train/rgb/c/{i}")
    cache.evict()
    assert oldest.is_file()
    touch(oldest)


def test_objects_that_fail_their_check_are_not_cached(tmp_path: Path) -> None:
    origin = _origin(tmp_path, 2)
    cache = ReadThroughCache(tmp_path / "cache", "s3://b/p/s.zarr", "build1", 1 << 30, origin)

    def refuse(key: str, data: bytes) -> None:
        raise DataError(f"{key} is damaged")

    with pytest.raises(DataError, match="train/rgb/c/0 is damaged"):
        cache.file("train/rgb/c/0", refuse)
    assert not (cache.root / "train" / "rgb" / "c" / "0").exists()
    assert cache.file("train/rgb/c/9") is None  # an object the origin does not have
    other_build = ReadThroughCache(tmp_path / "cache", "s3://b/p/s.zarr", "build2", 1 << 30, origin)
    assert other_build.root != cache.root  # a re-prepared store never reads the old build's objects
