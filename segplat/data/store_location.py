"""Where a patch store lives: a local folder or an S3 prefix, opened through one chosen client library.

`dataset.store_uri` names the store: a local folder (the default, `NAME-FINGERPRINT.zarr` under
`dataset.store_dir`) or `s3://bucket/prefix/NAME.zarr` on any S3-compatible endpoint. Credentials and the
endpoint come only from the client library's own environment and config (`AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_PROFILE`, `AWS_ENDPOINT_URL`, `~/.aws/config`): nothing secret is ever part of
a `StoreLocation`, so configs, logs, run folders and checkpoints cannot carry it.

Two clients are supported (`dataset.store_client`); docs/stores.md says why `fsspec`
(s3fs on aiobotocore, zarr's `FsspecStore`) is the default and when `obstore` (zarr's `ObjectStore`) is not
safe: its runtime does not survive a fork, so loader workers of an obstore store are started by forkserver.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import zarr
from fsspec.asyn import sync as fsspec_sync
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from segplat.errors import ConfigError, DataError

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")


@dataclass(frozen=True)
class StoreLocation:
    """A store's address plus how to reach it from this machine (client, local cache); picklable, secret-free."""

    uri: str
    client: str = "fsspec"
    cache_dir: str | None = None
    cache_max_bytes: int = 50 << 30

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def parse(cls, value: str | os.PathLike | StoreLocation, client: str = "fsspec", cache_dir: str | None = None,
              cache_max_gb: float = 50.0, key: str = "dataset.store_uri") -> StoreLocation:
        """Validate `value` (a folder, `file://...` or `s3://bucket/prefix`) in one sentence per mistake (`client`
        and `cache_max_gb` are typed on `segplat.data.DataModule`, whose config sets them)."""
        if isinstance(value, StoreLocation):
            return value
        text = str(value)
        parsed = urlparse(text)
        scheme = parsed.scheme.lower()
        cache = str(Path(cache_dir).expanduser().absolute()) if cache_dir else None
        max_bytes = int(float(cache_max_gb) * (1 << 30))
        if scheme in ("", "file") or (len(scheme) == 1 and text[1:2] == ":"):  # a path (or a Windows drive)
            path = parsed.path if scheme == "file" else text
            return cls(str(Path(path).expanduser().absolute()), client, cache, max_bytes)
        if scheme != "s3":
            raise ConfigError(f"{key}={text} uses the scheme {scheme}://, which segplat does not read; give a local "
                              "folder or an s3://bucket/prefix/NAME.zarr URI (any S3-compatible endpoint).")
        if "@" in parsed.netloc or parsed.password or parsed.query:
            raise ConfigError(f"{key} must not carry credentials or options (user:secret@ or ?...); give "
                              "s3://bucket/prefix and put credentials in AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY "
                              "or an AWS profile, which are never written to run folders.")
        bucket, prefix = parsed.netloc, parsed.path.strip("/")
        if not _BUCKET.match(bucket or ""):
            raise ConfigError(f"{key}={text} does not name a valid bucket ({bucket!r}); write s3://bucket/prefix.")
        if not prefix:
            raise ConfigError(f"{key}={text} names a whole bucket; give a prefix for the store, e.g. "
                              f"s3://{bucket}/stores/NAME.zarr.")
        return cls(f"s3://{bucket}/{prefix}", client, cache, max_bytes)

    # -- facts ------------------------------------------------------------------------------------
    @property
    def remote(self) -> bool:
        return self.uri.startswith("s3://")

    @property
    def path(self) -> Path:
        """The folder of a local store."""
        if self.remote:
            raise ValueError(f"{self.uri} is not a local folder")
        return Path(self.uri)

    @property
    def bucket(self) -> str:
        return urlparse(self.uri).netloc

    @property
    def prefix(self) -> str:
        return urlparse(self.uri).path.strip("/")

    def __str__(self) -> str:
        return self.uri

    def with_suffix(self, suffix: str) -> StoreLocation:
        """The same store address with `suffix` appended to its last component (`.partial`, `.lock`)."""
        return StoreLocation(self.uri + suffix, self.client, self.cache_dir, self.cache_max_bytes)

    # -- opening ----------------------------------------------------------------------------------
    def zarr_store(self, read_only: bool = True) -> zarr.abc.store.Store:
        """A zarr store for this location, created in the calling process (clients are never shared over fork)."""
        if not self.remote:
            return zarr.storage.LocalStore(self.uri, read_only=read_only)
        if self.client == "obstore":
            from obstore.store import S3Store

            endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            options = {"allow_http": True} if endpoint and endpoint.startswith("http://") else None
            return zarr.storage.ObjectStore(S3Store(self.bucket, prefix=self.prefix, client_options=options),
                                            read_only=read_only)
        return zarr.storage.FsspecStore.from_url(self.uri, read_only=read_only,
                                                 storage_options={"use_listings_cache": False})

    def endpoint(self) -> str:
        """The endpoint the client talks to, for messages (never credentials)."""
        return (os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
                or "the default AWS S3 endpoint")


class ObjectAccess:
    """The few whole-object operations the writer, the marker and the cache need, on any zarr store."""

    def __init__(self, location: StoreLocation, read_only: bool = True) -> None:
        self.location = location
        self.store = location.zarr_store(read_only=read_only)

    def get(self, key: str, byte_range: Any = None) -> bytes | None:
        """The object's bytes (or a zarr ByteRequest of them); None when it does not exist."""
        try:
            buf = sync(self.store.get(key, default_buffer_prototype(), byte_range))
        except Exception as err:
            raise remote_error(err, self.location, f"reading {key}") from err
        return None if buf is None else buf.to_bytes()

    def put(self, key: str, data: bytes) -> None:
        try:
            sync(self.store.set(key, default_buffer_prototype().buffer.from_bytes(data)))
        except Exception as err:
            raise remote_error(err, self.location, f"writing {key}") from err

    def delete(self, key: str) -> None:
        try:
            sync(self.store.delete(key))
        except FileNotFoundError:
            pass
        except Exception as err:
            raise remote_error(err, self.location, f"deleting {key}") from err

    def delete_all(self) -> None:
        try:
            sync(self.store.delete_dir(""))
        except FileNotFoundError:
            pass
        except Exception as err:
            raise remote_error(err, self.location, "deleting the store") from err

    def keys(self, prefix: str = "") -> list[str]:
        async def collect() -> list[str]:
            return [k async for k in self.store.list_prefix(prefix)]

        try:
            return sync(collect())
        except FileNotFoundError:
            return []
        except Exception as err:
            raise remote_error(err, self.location, "listing the store") from err


def check_access(location: StoreLocation) -> None:
    """Before any work: the endpoint answers, the bucket exists and the credentials are accepted."""
    if not location.remote:
        return
    if location.client == "obstore":
        import obstore

        store = location.zarr_store(read_only=True).store
        try:
            next(iter(obstore.list(store, chunk_size=1)), None)
        except Exception as err:
            raise remote_error(err, location, "listing the bucket") from err
        return
    import s3fs

    fs = s3fs.S3FileSystem(use_listings_cache=False, skip_instance_cache=True)  # reads the credentials now
    try:
        fs.call_s3("list_objects_v2", Bucket=location.bucket, Prefix=location.prefix + "/", MaxKeys=1)
    except Exception as err:
        raise remote_error(err, location, "listing the bucket") from err
    finally:
        if fs._s3 is not None:
            fsspec_sync(fs.loop, fs._s3.close)


_CREDENTIAL_CODES = ("SignatureDoesNotMatch", "InvalidAccessKeyId", "AccessDenied", "InvalidToken", "ExpiredToken",
                     "AuthorizationHeaderMalformed", "InvalidClientTokenId", "Forbidden")
_CONNECTION_WORDS = ("Connection refused", "Could not connect", "connection error", "error sending request",
                     "Name or service not known", "nodename nor servname", "Temporary failure in name resolution",
                     "timed out", "Connect timeout", "EndpointConnectionError", "Cannot connect")


def remote_error(err: BaseException, location: StoreLocation, doing: str) -> BaseException:
    """One sentence for a failed object-store call: missing bucket, refused credentials or unreachable endpoint.

    Only the error's class and S3 error code are quoted, never its full text (which could echo request headers)."""
    if not location.remote or isinstance(err, DataError):
        return err
    text = f"{type(err).__name__}: {err}"
    for cause in (err.__cause__, err.__context__):
        if cause is not None:
            text += f" {type(cause).__name__}: {cause}"
    where = f"dataset.store_uri={location.uri} (endpoint {location.endpoint()}, client {location.client})"
    lower = text.lower()
    missing_bucket = DataError(f"the bucket {location.bucket!r} of {where} does not exist; create it or correct "
                               "the URI.")
    if "NoSuchBucket" in text:
        return missing_bucket
    no_credentials = "unable to locate credentials" in lower or ("credentials" in lower and "missing" in lower)
    if "NoCredentials" in text or no_credentials:
        return DataError(f"no S3 credentials were found for {where}; set AWS_ACCESS_KEY_ID and "
                         "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) in the environment.")
    code = next((c for c in _CREDENTIAL_CODES if c in text), None)
    if code is not None or isinstance(err, PermissionError):
        return DataError(f"the S3 credentials were refused ({code or 'access denied'}) while {doing} for {where}; "
                         "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE for this endpoint.")
    if "does not exist" in lower and "bucket" in lower:
        return missing_bucket
    if any(w.lower() in text.lower() for w in _CONNECTION_WORDS) or isinstance(err, ConnectionError | TimeoutError):
        return DataError(f"the S3 endpoint {location.endpoint()} cannot be reached while {doing} for "
                         f"dataset.store_uri={location.uri}; check AWS_ENDPOINT_URL (or the profile's endpoint_url) "
                         "and the network.")
    return DataError(f"{doing} failed for {where} ({type(err).__name__}); check the store and the endpoint.")
