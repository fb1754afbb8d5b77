"""Riding out what storage does: which errors are transient and which mean a full disk,
retries with backoff and jitter (``RetryingStorage``), and the preflight that finds an
unusable run directory before the first step instead of at the first save."""

from __future__ import annotations

import contextlib
import errno
import os
import random
import secrets
import socket
from collections.abc import Callable, Iterator, Mapping
from typing import TypeVar

import tenacity
import torch

from hardtrain.checkpoint._format import Digest
from hardtrain.checkpoint._storage import Storage, never_stop
from hardtrain.errors import CheckpointStorageError

T = TypeVar("T")

_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
_FULL_CODES = {"QuotaExceeded", "XMinioStorageFull", "InsufficientStorage", "StorageFull"}
_TRANSIENT_ERRNOS = {
    errno.EAGAIN, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNABORTED, errno.ECONNREFUSED,
    errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN, errno.ENETRESET, errno.EPIPE,
    errno.EREMOTEIO,  # s3fs: an S3 InternalError (500)
}
_TRANSIENT_CODES = {
    "SlowDown", "Throttling", "ThrottlingException", "TooManyRequests", "RequestTimeout",
    "RequestTimeoutException", "InternalError", "ServiceUnavailable", "RequestLimitExceeded",
    "BandwidthLimitExceeded", "OperationAborted",
}
# Connection and timeout errors of the HTTP stacks under fsspec (botocore, aiohttp, ...),
# by class name: hardtrain does not import them.
_TRANSIENT_NAMES = {
    "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError",
    "ConnectionClosedError", "ClientConnectionError", "ClientConnectorError",
    "ServerDisconnectedError", "ClientOSError", "ServerTimeoutError", "HTTPClientError",
    "IncompleteRead", "FSTimeoutError", "ResponseParserError", "ClientPayloadError",
    "ProxyConnectionError", "RemoteDisconnected",
}
_BACKOFF_S = 0.5  # the first retry waits up to this long, doubling up to _MAX_WAIT_S
_MAX_WAIT_S = 20.0


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__  # type: ignore[assignment]


def _http(error: BaseException) -> tuple[str | None, int | None]:
    """An HTTP client error's code and status (botocore's ``response``), if it has them."""
    response = getattr(error, "response", None)
    if not isinstance(response, dict):
        return None, None
    code = (response.get("Error") or {}).get("Code")
    status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
    return (str(code) if code is not None else None,
            int(status) if isinstance(status, int) else None)


def is_full(error: BaseException) -> bool:
    """A full disk or an exhausted quota: ENOSPC, EDQUOT, or an object store's quota error."""
    for e in _chain(error):
        if isinstance(e, OSError) and e.errno in _FULL_ERRNOS:
            return True
        code, status = _http(e)
        if code in _FULL_CODES or status == 507:
            return True
    return False


def is_transient(error: BaseException) -> bool:
    """Worth retrying: timeouts, connection resets, throttling, 5xx. Never a full disk,
    a missing file, a permission or a bad request: retrying those changes nothing."""
    if is_full(error):
        return False
    for e in _chain(error):
        if isinstance(e, TimeoutError | ConnectionError):
            return True
        if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS:
            return True
        if any(cls.__name__ in _TRANSIENT_NAMES for cls in type(e).__mro__):
            return True
        code, status = _http(e)
        if code in _TRANSIENT_CODES or (status is not None and (status >= 500 or status == 429)):
            return True
    return False


class RetryingStorage:
    """A ``Storage`` whose every operation is retried on transient errors for up to
    ``retry_for_s`` (exponential backoff with full jitter; each retry is a
    ``storage_retried`` event through ``record``). Other errors pass through at once."""

    def __init__(self, inner: Storage, retry_for_s: float,
                 record: Callable[..., None]) -> None:
        self.inner = inner
        self.retry_for_s = retry_for_s
        self._record = record
        # Jitter from a generator of its own: the global ones are the run's, restored
        # bit for bit on resume; a retry must not draw from them.
        self._rng = random.Random(secrets.randbits(64))

    def _call(self, op: str, path: str, fn: Callable[[], T]) -> T:
        if self.retry_for_s <= 0:
            return fn()

        def wait(state: tenacity.RetryCallState) -> float:
            cap = min(_MAX_WAIT_S, _BACKOFF_S * 2 ** (state.attempt_number - 1))
            return self._rng.uniform(0, cap)

        def note(state: tenacity.RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome else None
            self._record("storage_retried", op=op, path=path, attempt=state.attempt_number,
                         error=f"{type(error).__name__}: {error}",
                         wait_s=round(state.upcoming_sleep, 3))

        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception(is_transient),
            stop=tenacity.stop_after_delay(self.retry_for_s), wait=wait,
            before_sleep=note, reraise=True,
        )
        return retrying(fn)

    def write_tensors(self, path: str, tensors: Mapping[str, torch.Tensor],
                      check: Callable[[], None] = never_stop) -> Digest:
        return self._call("write", path, lambda: self.inner.write_tensors(path, tensors, check))

    def write_bytes(self, path: str, data: bytes) -> Digest:
        return self._call("write", path, lambda: self.inner.write_bytes(path, data))

    @contextlib.contextmanager
    def read(self, path: str) -> Iterator[memoryview]:
        with contextlib.ExitStack() as stack:
            yield self._call("read", path, lambda: stack.enter_context(self.inner.read(path)))

    def read_head(self, path: str, num_bytes: int) -> bytes:
        return self._call("read", path, lambda: self.inner.read_head(path, num_bytes))

    def digest(self, path: str) -> Digest:
        return self._call("read", path, lambda: self.inner.digest(path))

    def move(self, path: str, new_path: str) -> None:
        self._call("move", path, lambda: self.inner.move(path, new_path))

    def size(self, path: str) -> int | None:
        return self._call("stat", path, lambda: self.inner.size(path))

    def listdir(self, path: str) -> list[str] | None:
        return self._call("list", path, lambda: self.inner.listdir(path))

    def makedirs(self, path: str) -> None:
        self._call("makedirs", path, lambda: self.inner.makedirs(path))

    def bucket_exists(self) -> bool:
        return self._call("stat", "", self.inner.bucket_exists)

    def sync_dir(self, path: str) -> None:
        self._call("sync", path, lambda: self.inner.sync_dir(path))

    def remove(self, path: str) -> None:
        self._call("remove", path, lambda: self.inner.remove(path))

    def rmdir(self, path: str) -> None:
        self._call("rmdir", path, lambda: self.inner.rmdir(path))


def preflight(storage: Storage, url: str) -> None:
    """Before the first step: the run directory exists (created if needed; a bucket never
    is) and a probe file can be written, read back and deleted through the path saves
    use. CheckpointStorageError naming the URL, the error and what to check."""
    probe = f".hardtrain-probe-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
    data = secrets.token_bytes(64)
    try:
        check_bucket(storage)
        storage.makedirs("")
        storage.write_bytes(probe, data)
        back = storage.read_head(probe, len(data) + 1)
        storage.remove(probe)
    except Exception as e:
        raise CheckpointStorageError(
            f"{url} cannot be used for checkpoints: {type(e).__name__}: {e}. Nothing was "
            f"trained. Check {_what_to_check(e)}."
        ) from e
    if back != data:
        raise CheckpointStorageError(
            f"{url} cannot be used for checkpoints: a probe file written there read back "
            f"{len(back)} different bytes. Nothing was trained. Check the storage's "
            "consistency settings (a cache in front of it, an eventually consistent mount)."
        )


def check_bucket(storage: Storage) -> None:
    """FileNotFoundError when the run directory's bucket does not exist: hardtrain never
    creates one, so a typo cannot train into a new bucket."""
    if not storage.bucket_exists():
        raise FileNotFoundError(
            errno.ENOENT, "the bucket does not exist (hardtrain never creates buckets)")


def _what_to_check(error: BaseException) -> str:
    if is_full(error):
        return "free space and quotas on that storage"
    for e in _chain(error):
        if isinstance(e, PermissionError):
            return "the credentials and the permissions on that path (write, read, delete)"
        if isinstance(e, FileNotFoundError):
            return "the path and the bucket name (the bucket must exist)"
    if is_transient(error):
        return "that the storage is reachable (endpoint, network, proxy); it failed after retries"
    return ("the bucket name and path, the credentials and permissions, free space, and the "
            "storage_options")
