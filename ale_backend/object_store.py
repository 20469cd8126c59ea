"""Where the model registry keeps its objects: a folder on this host, or an S3-compatible bucket shared by hosts.

``MODEL_REGISTRY`` chooses (:func:`open_store`): empty (the default) is ``MODEL_DIR`` itself, as a single host has
always had it; ``s3://bucket/prefix`` is a bucket, reached through boto3 with its standard configuration (the
credentials chain: environment, shared files, instance or task roles; ``AWS_ENDPOINT_URL`` for MinIO, Ceph or any
other S3-compatible store; ``AWS_REGION``).

Both stores offer the few operations the registry needs (:mod:`ale_backend.registry`), with the same guarantees:

* :meth:`write_set` stores a set of objects so that the last one appears only after all the others are complete
  (a folder: assembled under a hidden name and renamed into place at once; a bucket: uploaded in order, the last
  object last). The registry writes a version's weights first and its ``version.json`` last, and lists only
  versions that have the latter.
* :meth:`replace` writes an object only if it has not changed since it was read (its tag: a bucket's ETag with S3
  conditional writes, ``If-Match``; ``If-None-Match: *`` for one that must not exist yet; a folder: a digest of its
  content compared under a lock). Two writers that race leave one winner; the loser gets :class:`Changed`.
* :meth:`read_if_changed` reads an object only if its tag is not the one given (a bucket answers 304 without the
  body): how a host follows the served-version pointer without reading it in full every time.

Keys are ``/``-separated paths relative to the store's root (``projects/3/current``); a key never starts with a dot
or holds ``..``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

from ale_backend.lock import file_lock


class NotStored(FileNotFoundError):
    """No object has this key."""


class StoreError(RuntimeError):
    """The store cannot be used as the registry (unreachable, no access, no conditional writes); the message says
    why."""


class Changed(RuntimeError):
    """A conditional write found the object changed since it was read (another writer came first)."""


@dataclass(frozen=True)
class Stored:
    """An object's content and its tag (changes whenever the content does)."""

    data: bytes
    tag: str


Part = tuple[str, "bytes | Path"]
"""One object of a :meth:`ObjectStore.write_set`: its name under the set's prefix, and its content or a local file."""


class ObjectStore(Protocol):
    location: str
    """Where the objects are, for people: a folder's path or ``s3://bucket/prefix``."""
    is_local: bool
    """Whether a stored file can be used where it lies (a folder) or must be brought to the host first."""

    def read(self, key: str) -> Stored: ...
    def read_if_changed(self, key: str, tag: str | None) -> Stored | None: ...
    def write_set(self, prefix: str, parts: Sequence[Part]) -> None: ...
    def replace(self, key: str, data: bytes, expected: str | None) -> str: ...
    def keys(self, prefix: str) -> list[str]: ...
    def folders(self, prefix: str) -> list[str]: ...
    def what_failed(self, exc: Exception) -> str: ...
    def download(self, key: str, target: Path) -> None: ...
    def delete_under(self, prefix: str) -> None: ...
    def path(self, key: str) -> Path: ...


def open_store(registry: str, model_dir: Path) -> ObjectStore:
    """The store ``MODEL_REGISTRY`` names: ``s3://bucket/prefix``, or ``MODEL_DIR`` when empty."""
    if not registry:
        return FolderStore(Path(model_dir))
    parts = urlsplit(registry)
    if parts.scheme != "s3" or not parts.netloc:
        raise ValueError(f"MODEL_REGISTRY={registry!r}: expected s3://bucket/prefix, or nothing for MODEL_DIR")
    return BucketStore(parts.netloc, parts.path.strip("/"))


def _check_key(key: str) -> str:
    if not key or any(part in ("", ".", "..") or part.startswith(".") for part in key.split("/")):
        raise ValueError(f"not a key of the registry: {key!r}")
    return key


def content_tag(data: bytes) -> str:
    """A folder's tag of an object: a digest of its content."""
    return hashlib.sha256(data).hexdigest()[:32]


class FolderStore:
    """Objects as files under a folder (``MODEL_DIR``): keys are relative paths."""

    is_local = True

    def __init__(self, root: Path):
        self.root = Path(root)
        self.location = str(self.root)

    def path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def read(self, key: str) -> Stored:
        try:
            data = self.path(key).read_bytes()
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise NotStored(key) from exc
        return Stored(data, content_tag(data))

    def read_if_changed(self, key: str, tag: str | None) -> Stored | None:
        stored = self.read(key)
        return None if stored.tag == tag else stored

    def write_set(self, prefix: str, parts: Sequence[Part]) -> None:
        """The set appears at once: assembled in a hidden folder beside ``prefix``, then renamed to it (a crash
        leaves a ``.incoming-*`` folder, never a half-written set); an existing set of that name is an error."""
        final = self.path(prefix)
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".incoming-", dir=final.parent))
        try:
            for name, content in parts:
                target = staging / _check_key(name)
                target.parent.mkdir(parents=True, exist_ok=True)
                if isinstance(content, Path):
                    shutil.copyfile(content, target)
                else:
                    target.write_bytes(content)
            _fsync_dir(staging)
            try:
                os.rename(staging, final)
            except OSError as exc:  # a non-empty folder of that name
                if final.exists():
                    raise FileExistsError(f"{final} exists already") from exc
                raise
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def replace(self, key: str, data: bytes, expected: str | None) -> str:
        """Write ``key`` if its content's tag is still ``expected`` (None: if it does not exist), under a lock that
        every writer of this folder takes; the rename is atomic."""
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(target.parent / f".{target.name}.lock"):
            try:
                now = content_tag(target.read_bytes())
            except FileNotFoundError:
                now = None
            if now != expected:
                raise Changed(f"{key} changed since it was read")
            tmp = target.parent / f".{target.name}-{os.getpid()}-{os.urandom(4).hex()}"
            tmp.write_bytes(data)
            os.replace(tmp, target)
            _fsync_dir(target.parent)
        return content_tag(data)

    def keys(self, prefix: str) -> list[str]:
        """Every key under ``prefix`` (hidden files and folders left out)."""
        folder = self.path(prefix)
        if not folder.is_dir():
            return []
        found = []
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            relative = Path(dirpath).relative_to(self.root)
            found += [f"{relative.as_posix()}/{f}" for f in filenames if not f.startswith(".")]
        return sorted(found)

    def what_failed(self, exc: Exception) -> str:
        return f"({type(exc).__name__}: {exc}): check MODEL_DIR and its permissions"

    def folders(self, prefix: str) -> list[str]:
        """The names one level below ``prefix`` that hold keys (hidden ones left out)."""
        folder = self.path(prefix)
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))

    def download(self, key: str, target: Path) -> None:
        try:
            shutil.copyfile(self.path(key), target)
        except FileNotFoundError as exc:
            raise NotStored(key) from exc

    def delete_under(self, prefix: str) -> None:
        shutil.rmtree(self.path(prefix), ignore_errors=True)


class BucketStore:
    """Objects in an S3-compatible bucket under a prefix, through boto3 (standard configuration)."""

    is_local = False

    def __init__(self, bucket: str, prefix: str = "", client=None):
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.location = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self._client = client
        self._injected = client is not None
        self._quick = None

    @property
    def client(self):
        """The client of every call but the small reads (uploads, downloads, lists): bounded by
        :data:`BUCKET_TIMEOUTS`."""
        if self._client is None:
            self._client = _bounded_client(**BUCKET_TIMEOUTS)
        return self._client

    @property
    def quick_client(self):
        """The client of small reads (the served-version pointer, a version's record, on the request path):
        :data:`QUICK_TIMEOUTS`, so that a store that stops answering holds a request seconds, not minutes."""
        if self._quick is None:
            self._quick = self._client if self._client is not None and self._injected else _bounded_client(
                **QUICK_TIMEOUTS)
        return self._quick

    def _key(self, key: str) -> str:
        key = _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def path(self, key: str) -> Path:
        raise NotImplementedError(f"{self.location} holds no local files: bring the object to the host")

    def read(self, key: str) -> Stored:
        stored = self.read_if_changed(key, None)
        assert stored is not None
        return stored

    def read_if_changed(self, key: str, tag: str | None) -> Stored | None:
        from botocore.exceptions import ClientError

        request = {"Bucket": self.bucket, "Key": self._key(key)}
        if tag:
            request["IfNoneMatch"] = tag
        try:
            response = self.quick_client.get_object(**request)
        except ClientError as exc:
            code = _code(exc)
            if code in ("304", "NotModified"):
                return None
            if code in ("NoSuchKey", "404"):
                raise NotStored(key) from exc
            raise
        with response["Body"] as body:
            return Stored(body.read(), response["ETag"])

    def write_set(self, prefix: str, parts: Sequence[Part]) -> None:
        """Uploaded in order: the last part is stored only after every other one is complete. A set that exists
        under ``prefix`` (any object there) is refused, as a folder refuses it: :class:`FileExistsError`."""
        if self.keys(prefix):
            raise FileExistsError(f"{self.location}/{prefix} exists already")
        for name, content in parts:
            key = self._key(f"{prefix}/{name}")
            if isinstance(content, Path):
                self.client.upload_file(str(content), self.bucket, key)
            else:
                self.client.put_object(Bucket=self.bucket, Key=key, Body=content)

    def replace(self, key: str, data: bytes, expected: str | None) -> str:
        from botocore.exceptions import ClientError

        condition = {"IfMatch": expected} if expected else {"IfNoneMatch": "*"}
        try:
            response = self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, **condition)
        except ClientError as exc:
            # 412: the tag differs; 409: a concurrent conditional write; 404: it was expected but is gone
            if _code(exc) in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409", "NoSuchKey", "404"):
                raise Changed(f"{key} changed since it was read") from exc
            raise
        return response["ETag"]

    def keys(self, prefix: str) -> list[str]:
        full = self._key(prefix).rstrip("/") + "/"
        start = len(self.prefix) + 1 if self.prefix else 0
        found = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
            found += [item["Key"][start:] for item in page.get("Contents", [])]
        return sorted(found)

    def folders(self, prefix: str) -> list[str]:
        full = self._key(prefix).rstrip("/") + "/"
        found = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full,
                                                                           Delimiter="/"):
            found += [item["Prefix"][len(full):].rstrip("/") for item in page.get("CommonPrefixes", [])]
        return sorted(found)

    def download(self, key: str, target: Path) -> None:
        from botocore.exceptions import ClientError

        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if _code(exc) in ("NoSuchKey", "404"):
                raise NotStored(key) from exc
            raise
        with response["Body"] as body, open(target, "wb") as out:
            for chunk in iter(lambda: body.read(1 << 20), b""):
                out.write(chunk)

    def check_conditional_writes(self) -> None:
        """Make sure the bucket answers within the request path's bounds and refuses a stale conditional write (a
        store that ignores ``If-None-Match`` would let two promotions both win); raises :class:`StoreError` saying
        so, or why the bucket cannot be read or written. A read, two small writes and a delete: what a worker checks
        at start, and ``python _wsgi.py --check``."""
        key = f"probes/conditional-{os.getpid()}-{os.urandom(4).hex()}"
        try:
            try:  # the quick client first: a store that does not answer is told in seconds
                self.read_if_changed(key, None)
            except NotStored:
                pass
            self.replace(key, b"1", None)
            try:
                self.replace(key, b"2", None)
            except Changed:
                return
            finally:
                self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as exc:
            raise StoreError(f"{self.location} cannot be written: {self.what_failed(exc)}") from exc
        raise StoreError(f"{self.location} ignores conditional writes (If-None-Match): promotions on several hosts "
                         "could overwrite each other; use a store that supports them (AWS S3, recent MinIO)")

    def what_failed(self, exc: Exception) -> str:
        """Why a call to the bucket failed, in words, and what to set: the store does not answer, the credentials
        are missing or refused, or the bucket does not exist."""
        from botocore.exceptions import (
            ClientError,
            ConnectTimeoutError,
            EndpointConnectionError,
            NoCredentialsError,
            ReadTimeoutError,
        )

        endpoint = self.client.meta.endpoint_url
        raw = f"({type(exc).__name__}: {exc})"
        if isinstance(exc, (EndpointConnectionError, ConnectionError, ConnectTimeoutError, ReadTimeoutError)):
            return (f"the store at {endpoint} does not answer {raw}: check AWS_ENDPOINT_URL (empty for AWS S3) and "
                    "that the store is running")
        if isinstance(exc, NoCredentialsError):
            return (f"no credentials were found {raw}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or "
                    "AWS_PROFILE)")
        code = _code(exc) if isinstance(exc, ClientError) else ""
        if code == "NoSuchBucket":
            return (f"bucket {self.bucket!r} does not exist at {endpoint} {raw}: create it, or set MODEL_REGISTRY "
                    "to s3://<an existing bucket>/<prefix>")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "InvalidToken",
                    "ExpiredToken"):
            return (f"the credentials are refused {raw}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY to a key "
                    f"that may read and write {self.location}")
        return f"{raw}: check MODEL_REGISTRY, the credentials (AWS_ACCESS_KEY_ID...) and AWS_ENDPOINT_URL"

    def delete_under(self, prefix: str) -> None:
        keys = [self._key(k) for k in self.keys(prefix)]
        for start in range(0, len(keys), 1000):
            self.client.delete_objects(Bucket=self.bucket, Delete={
                "Objects": [{"Key": k} for k in keys[start:start + 1000]], "Quiet": True})


BUCKET_TIMEOUTS = {"connect_timeout": 5.0, "read_timeout": 60.0, "attempts": 3}
"""Seconds to connect, seconds a read may wait for bytes, and tries (botocore's defaults: 60, 60 and, with its
legacy retries, 5), for uploads, downloads and lists."""
QUICK_TIMEOUTS = {"connect_timeout": 2.0, "read_timeout": 3.0, "attempts": 2}
"""The same for the small reads on the request path: Label Studio gives ``/setup`` 3 s."""


def _bounded_client(connect_timeout: float, read_timeout: float, attempts: int):
    """A boto3 S3 client with its standard configuration (credentials chain, ``AWS_ENDPOINT_URL``...) and these
    bounds."""
    import boto3
    from botocore.config import Config

    return boto3.client("s3", config=Config(connect_timeout=connect_timeout, read_timeout=read_timeout,
                                            retries={"max_attempts": attempts, "mode": "standard"}))


def _code(exc) -> str:
    error = exc.response.get("Error", {})
    return str(error.get("Code") or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
