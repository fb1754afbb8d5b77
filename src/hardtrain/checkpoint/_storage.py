"""Where checkpoint bytes go: a local filesystem (atomic, fsynced) or any fsspec store.

Local: every file is written under a temporary name in its own folder (never across
filesystems), fsynced, renamed into place; the folder is fsynced after. Object stores
(s3://, gs://, memory://): each object is one PUT, data objects first, the manifest last.
Any error aborts: no retry, nothing half-committed.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import secrets
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

import fsspec
import safetensors.torch
import torch
from fsspec.implementations.local import LocalFileSystem

from hardtrain.checkpoint._format import (
    TMP_MARKER,
    Digest,
    Hasher,
    digest_of,
)
from hardtrain.checkpoint._safetensors import encode_safetensors


def never_stop() -> None:
    """The default ``check`` of a write: never stops it."""


class Storage(Protocol):
    """The seam between the store and the bytes. Paths are "/"-joined below the root."""

    def write_tensors(self, path: str, tensors: Mapping[str, torch.Tensor],
                      check: Callable[[], None] = never_stop) -> Digest:
        """Durably write a safetensors file; return its size and checksums. ``check`` is
        called between pieces of the write; what it raises stops the write (nothing is
        left behind)."""

    def write_bytes(self, path: str, data: bytes) -> Digest:
        """Durably write a small file; return its size and checksums."""

    def read(self, path: str) -> contextlib.AbstractContextManager[memoryview]:
        """The file's bytes, readable while the context is open."""

    def read_head(self, path: str, num_bytes: int) -> bytes:
        """The file's first bytes (without fetching the rest)."""

    def digest(self, path: str) -> Digest:
        """The file's size and checksums, streamed: an I/O error is an OSError."""

    def move(self, path: str, new_path: str) -> None:
        """Rename a folder (atomic on a local filesystem)."""

    def size(self, path: str) -> int | None:
        """The file's size in bytes, or None when it does not exist."""

    def listdir(self, path: str) -> list[str] | None:
        """The names in a folder, or None when it does not exist."""

    def makedirs(self, path: str) -> None:
        """Make a folder and its parents; never a bucket."""

    def bucket_exists(self) -> bool:
        """Whether the root's bucket exists (True where there are no buckets)."""

    def sync_dir(self, path: str) -> None:
        """Make the folder's entries durable (a no-op on object stores)."""

    def remove(self, path: str) -> None: ...

    def rmdir(self, path: str) -> None:
        """Remove an empty folder; leave it where it is not empty."""


def open_storage(root: str, storage_options: Mapping[str, Any] | None = None) -> Storage:
    fs, path = fsspec.core.url_to_fs(root, **dict(storage_options or {}))
    if isinstance(fs, LocalFileSystem):
        return LocalStorage(path)
    return FsspecStorage(fs, path)


def _tmp_path(path: str) -> str:
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}{TMP_MARKER}{os.getpid()}-{secrets.token_hex(4)}")


class LocalStorage:
    def __init__(self, root: str) -> None:
        self.root = root

    def _abs(self, path: str) -> str:
        return os.path.join(self.root, path) if path else self.root

    def write_tensors(self, path: str, tensors: Mapping[str, torch.Tensor],
                      check: Callable[[], None] = never_stop) -> Digest:
        # Straight from the tensors' memory (no copy), in pieces, so that an abandoned
        # save stops within one piece instead of at the end of the file.
        header, pieces = encode_safetensors(tensors)

        def write(tmp: str) -> None:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                _write_all(fd, memoryview(header))
                for piece in pieces:
                    for start in range(0, len(piece), _WRITE_PIECE):
                        check()
                        _write_all(fd, piece[start : start + _WRITE_PIECE])
            finally:
                os.close(fd)

        return self._write(path, write)

    def write_bytes(self, path: str, data: bytes) -> Digest:
        return self._write(path, lambda tmp: _write_new_file(tmp, data))

    def _write(self, path: str, write: Callable[[str], None]) -> Digest:
        """``write`` a temporary file beside ``path``, fsync it, hash what landed in it (not
        what was meant to be written), then rename it into place. Nothing is left behind
        on failure."""
        final = self._abs(path)
        tmp = _tmp_path(final)
        try:
            write(tmp)
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
                digest = _digest_fd(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return digest

    @contextlib.contextmanager
    def read(self, path: str) -> Iterator[memoryview]:
        fd = os.open(self._abs(path), os.O_RDONLY)
        try:
            with _mapped(fd) as view:
                yield view
        finally:
            os.close(fd)

    def read_head(self, path: str, num_bytes: int) -> bytes:
        with open(self._abs(path), "rb") as f:
            return f.read(num_bytes)

    def digest(self, path: str) -> Digest:
        fd = os.open(self._abs(path), os.O_RDONLY)
        try:
            return _digest_fd(fd)
        finally:
            os.close(fd)

    def move(self, path: str, new_path: str) -> None:
        os.rename(self._abs(path), self._abs(new_path))
        self.sync_dir(os.path.dirname(self._abs(path)))

    def size(self, path: str) -> int | None:
        try:
            return os.stat(self._abs(path)).st_size
        except FileNotFoundError:
            return None

    def listdir(self, path: str) -> list[str] | None:
        try:
            return os.listdir(self._abs(path))
        except (FileNotFoundError, NotADirectoryError):
            return None

    def makedirs(self, path: str) -> None:
        target = self._abs(path)
        missing = []
        while not os.path.isdir(target):
            missing.append(target)
            target = os.path.dirname(target)
        os.makedirs(self._abs(path), exist_ok=True)
        for folder in reversed(missing):  # each new entry durable in its parent
            self.sync_dir(os.path.dirname(folder))

    def bucket_exists(self) -> bool:
        return True

    def sync_dir(self, path: str) -> None:
        fd = os.open(self._abs(path), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def remove(self, path: str) -> None:
        os.unlink(self._abs(path))

    def rmdir(self, path: str) -> None:
        with contextlib.suppress(OSError):
            os.rmdir(self._abs(path))


@contextlib.contextmanager
def _mapped(fd: int) -> Iterator[memoryview]:
    """The file behind ``fd`` as a read-only shared mapping of the page cache: reading it
    copies nothing (a writable private mapping would be copied page by page on populate)."""
    size = os.fstat(fd).st_size
    if size == 0:
        yield memoryview(b"")
        return
    flags = mmap.MAP_SHARED
    mapping = mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ)
    view = memoryview(mapping)
    try:
        yield view
    finally:
        with contextlib.suppress(BufferError):  # a caller still holds a view: GC closes it
            view.release()
            mapping.close()


_READ_BLOCK = 1 << 20


_WRITE_PIECE = 64 << 20  # an abandoned save stops within this many bytes of a file


def _write_new_file(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        _write_all(fd, memoryview(data))
    finally:
        os.close(fd)


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        view = view[os.write(fd, view) :]


def _digest_fd(fd: int) -> Digest:
    """Size and checksums of a file, read 1 MiB at a time into one reused buffer: no
    resident memory to speak of, and a disk error is an OSError (a mapping would turn it
    into SIGBUS)."""
    hasher = Hasher()
    block = bytearray(_READ_BLOCK)
    view = memoryview(block)
    offset = 0
    while True:
        n = os.preadv(fd, [view], offset)
        if n == 0:
            return hasher.digest()
        hasher.update(view[:n])
        offset += n


class FsspecStorage:
    def __init__(self, fs: Any, root: str) -> None:
        self.fs = fs
        self.root = root.rstrip("/")

    def _abs(self, path: str) -> str:
        return f"{self.root}/{path}" if path else self.root

    def write_tensors(self, path: str, tensors: Mapping[str, torch.Tensor],
                      check: Callable[[], None] = never_stop) -> Digest:
        return self.write_bytes(path, safetensors.torch.save(dict(tensors)))

    def write_bytes(self, path: str, data: bytes) -> Digest:
        self.fs.pipe_file(self._abs(path), data)
        return digest_of(data)

    @contextlib.contextmanager
    def read(self, path: str) -> Iterator[memoryview]:
        yield memoryview(self.fs.cat_file(self._abs(path)))

    def read_head(self, path: str, num_bytes: int) -> bytes:
        return bytes(self.fs.cat_file(self._abs(path), start=0, end=num_bytes))

    def digest(self, path: str) -> Digest:
        hasher = Hasher()
        with self.fs.open(self._abs(path), "rb", block_size=_READ_BLOCK) as f:
            while block := f.read(_READ_BLOCK):
                hasher.update(block)
        return hasher.digest()

    def move(self, path: str, new_path: str) -> None:
        self.fs.mv(self._abs(path), self._abs(new_path), recursive=True)

    def size(self, path: str) -> int | None:
        target = self._abs(path)
        self.fs.invalidate_cache(target)  # another rank or process may have changed it
        try:
            return int(self.fs.info(target)["size"])
        except FileNotFoundError:
            return None

    def listdir(self, path: str) -> list[str] | None:
        target = self._abs(path)
        self.fs.invalidate_cache(target)
        try:
            entries = self.fs.ls(target, detail=False)
        except FileNotFoundError:
            return None
        names = [e.rstrip("/").rsplit("/", 1)[-1] for e in entries]
        return [n for n in names if n] if names or self.fs.isdir(target) else None

    def makedirs(self, path: str) -> None:
        if hasattr(self.fs, "split_path"):  # a bucketed object store: keys need no folders,
            return  # and its makedirs would create a missing bucket
        self.fs.makedirs(self._abs(path), exist_ok=True)

    def bucket_exists(self) -> bool:
        if not hasattr(self.fs, "split_path"):
            return True
        bucket = self.fs.split_path(self.root)[0]
        self.fs.invalidate_cache(bucket)
        return bool(self.fs.exists(bucket))

    def sync_dir(self, path: str) -> None:
        pass

    def remove(self, path: str) -> None:
        self.fs.rm_file(self._abs(path))

    def rmdir(self, path: str) -> None:
        with contextlib.suppress(OSError, NotImplementedError):
            self.fs.rmdir(self._abs(path))
