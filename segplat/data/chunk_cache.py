"""A size-bounded local read-through cache of whole store objects (`dataset.cache_dir`).

Why whole objects: a sharded store's object holds `tiles_per_shard` tiles, and an epoch reads every tile,
so fetching a shard once and serving its tiles from a local file (through the same memory maps as a local
store, chunk_reader.py) makes epoch 2 as fast as a local sharded store. Objects are checked (every chunk's
checksum) before they enter the cache, so what is cached was correct when fetched.

Safe with several loader workers and several processes on one node: a fetch is written to a temporary file
and renamed into place (readers see a whole object or none); one striped `flock` per key avoids fetching the
same object twice at once; eviction (oldest modification time first, which readers bump when they first map a
file) runs under one cache-wide lock when the bytes a process added since its last scan pass 1/32 of the
bound. A file evicted while mapped stays readable by whoever mapped it (POSIX unlink semantics). The bound can
be exceeded by at most that slack per process between scans.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

LOCK_STRIPES = 64


class ReadThroughCache:
    """Local copies of remote objects of one store build, under `cache_dir/<uri hash>-<build>/`."""

    def __init__(self, cache_dir: str | os.PathLike, uri: str, build: str, max_bytes: int,
                 fetch: Callable[[str], bytes | None]) -> None:
        self.cache_dir = Path(cache_dir)
        digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
        self.root = self.cache_dir / f"{digest}-{build}"
        self.max_bytes = int(max_bytes)
        self.fetch = fetch
        self._added = 0
        self._scan_every = max(1, self.max_bytes // 32)

    def file(self, key: str, check: Callable[[str, bytes], None] | None = None) -> Path | None:
        """The local file holding object `key`, fetched on a miss; None when the object does not exist.

        `check(key, data)` runs on fetched bytes before they are installed and raises to refuse them."""
        path = self.root / key
        if path.is_file():
            return path
        with self._lock(f"key-{zlib.crc32(key.encode()) % LOCK_STRIPES}"):
            if path.is_file():  # another process fetched it while we waited
                return path
            data = self.fetch(key)
            if data is None:
                return None
            if check is not None:
                check(key, data)
            self.install(key, data)
        return path

    def install(self, key: str, data: bytes) -> Path:
        """Put `data` in place as object `key`: a temporary file renamed, so readers see all of it or nothing."""
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._added += len(data)
        if self._added >= self._scan_every:
            self.evict()
        return path

    def evict(self) -> int:
        """Delete the least recently used files until the cache holds at most 90 % of its bound; returns bytes freed."""
        self._added = 0
        with self._lock("evict"):
            files = []
            total = 0
            for path in self._files():
                try:
                    st = path.stat()
                except FileNotFoundError:
                    continue
                files.append((st.st_mtime, st.st_size, path))
                total += st.st_size
            if total <= self.max_bytes:
                return 0
            freed = 0
            target = total - int(self.max_bytes * 0.9)
            for _, size, path in sorted(files):
                if freed >= target:
                    break
                path.unlink(missing_ok=True)
                freed += size
            return freed

    def size(self) -> int:
        return sum(p.stat().st_size for p in self._files())

    def _files(self) -> Iterator[Path]:
        """Every cached object of every store under cache_dir (the bound is for the whole folder)."""
        if not self.cache_dir.is_dir():
            return
        for dirpath, dirnames, filenames in os.walk(self.cache_dir):
            dirnames[:] = [d for d in dirnames if d != ".locks"]
            for name in filenames:
                if not name.endswith(".part"):
                    yield Path(dirpath) / name

    @contextmanager
    def _lock(self, name: str) -> Iterator[None]:
        lock_dir = self.cache_dir / ".locks"
        lock_dir.mkdir(parents=True, exist_ok=True)
        with open(lock_dir / f"{name}.lock", "a") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def touch(path: Path) -> None:
    """Mark a cached file as recently used (called once per process when it is first mapped)."""
    with suppress(OSError):
        os.utime(path)
