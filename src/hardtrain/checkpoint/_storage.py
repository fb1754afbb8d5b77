"""Where checkpoint bytes go: a local filesystem (atomic, fsynced) or any fsspec store.

Local: every file is written under a temporary name in its own folder (never across
filesystems), fsynced, renamed into place; the folder is fsynced after. Object stores
(s3://, gs://, memory://): each object is one PUT, data objects first, the manifest last.
Any error aborts: no retry, nothing half-committed.

Others may write the run directory (a shared filesystem): below the root, a local
storage follows no symlink and opens no FIFO, socket or device (``NotRegularFileError``),
and a temporary file's name says which process writes it, so that cleanup removes only
those whose owner is provably gone (``removable``). Object stores have neither links nor
special files.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import stat
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

import fsspec
import safetensors.torch
import torch
from fsspec.implementations.local import LocalFileSystem

from hardtrain._files import (
    FOLDER_FLAGS,
    SAFE_FLAGS,
    NotRegularFileError,
    not_regular,
    open_regular,
)
from hardtrain.checkpoint._format import (
    Digest,
    Hasher,
    digest_of,
)
from hardtrain.checkpoint._safetensors import encode_safetensors
from hardtrain.checkpoint._tmpfiles import WRITING, tmp_name


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
        """Rename a folder (atomic on a local filesystem); a symlink is renamed itself."""

    def size(self, path: str) -> int | None:
        """The file's size in bytes, or None when it does not exist. Local storage:
        ``NotRegularFileError`` for a symlink, FIFO, ... or a path through one."""

    def listdir(self, path: str) -> list[str] | None:
        """The names in a folder, or None when it does not exist (locally: or is not a
        folder reached without following a link)."""

    def makedirs(self, path: str) -> None:
        """Make a folder and its parents; never a bucket."""

    def bucket_exists(self) -> bool:
        """Whether the root's bucket exists (True where there are no buckets)."""

    def sync_dir(self, path: str) -> None:
        """Make the folder's entries durable (a no-op on object stores)."""

    def remove(self, path: str) -> None:
        """Remove a file (locally: a regular file only, else ``NotRegularFileError``)."""

    def rmdir(self, path: str) -> None:
        """Remove an empty folder; leave it where it is not empty."""


def open_storage(root: str, storage_options: Mapping[str, Any] | None = None) -> Storage:
    fs, path = fsspec.core.url_to_fs(root, **dict(storage_options or {}))
    if isinstance(fs, LocalFileSystem):
        return LocalStorage(path)
    return FsspecStorage(fs, path)


# ------------------------------------------------------------------------ local disks


def _open_folder(name: str, dir_fd: int, shown: str) -> int:
    """The folder ``name`` in ``dir_fd``, never through a link (nor a FIFO: no blocking)."""
    try:
        return os.open(name, FOLDER_FLAGS, dir_fd=dir_fd)
    except OSError as e:
        if e.errno in (errno.ENOTDIR, errno.ELOOP):
            raise not_regular(shown, name, dir_fd, expected="a folder") from None
        raise


def _split(path: str) -> tuple[str, str]:
    """(folder, name) of a "/"-joined path below the root."""
    folder, _, name = path.rpartition("/")
    return folder, name


class LocalStorage:
    """A local (or mounted) filesystem. The root is the caller's choice, links and all;
    below it nothing is followed: a folder reached through a symlink, or a symlink, FIFO,
    socket or device where a file is read, written or removed, is ``NotRegularFileError``
    (``hardtrain._files``). Every path is walked from the root one folder at a time
    (``O_NOFOLLOW``), so a link swapped in meanwhile is refused too."""

    def __init__(self, root: str) -> None:
        self.root = root

    @contextlib.contextmanager
    def _folder(self, path: str, *, create: bool = False) -> Iterator[int]:
        """A descriptor of the folder ``path`` below the root, reached without following
        a link; with ``create``, missing folders are made (each durable in its parent).
        FileNotFoundError when it is missing, NotRegularFileError when something else
        than a folder stands on the way."""
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            walked = []
            for part in path.split("/") if path else []:
                walked.append(part)
                shown = "/".join(walked)
                if part in ("", ".", ".."):
                    raise NotRegularFileError(f"{path}: not a plain path below the root")
                try:
                    inner = _open_folder(part, fd, shown)
                except FileNotFoundError:
                    if not create:
                        raise
                    with contextlib.suppress(FileExistsError):  # another rank made it
                        os.mkdir(part, dir_fd=fd)
                        os.fsync(fd)
                    inner = _open_folder(part, fd, shown)
                os.close(fd)
                fd = inner
            yield fd
        finally:
            os.close(fd)

    def _open_file(self, path: str) -> int:
        """A regular file below the root, open for reading (never a link, FIFO, device)."""
        folder, name = _split(path)
        with self._folder(folder) as dir_fd:
            return open_regular(name, os.O_RDONLY, dir_fd=dir_fd, shown=path)

    def write_tensors(self, path: str, tensors: Mapping[str, torch.Tensor],
                      check: Callable[[], None] = never_stop) -> Digest:
        # Straight from the tensors' memory (no copy), in pieces, so that an abandoned
        # save stops within one piece instead of at the end of the file.
        header, pieces = encode_safetensors(tensors)

        def write(fd: int) -> None:
            _write_all(fd, memoryview(header))
            for piece in pieces:
                for start in range(0, len(piece), _WRITE_PIECE):
                    check()
                    _write_all(fd, piece[start : start + _WRITE_PIECE])

        return self._write(path, write)

    def write_bytes(self, path: str, data: bytes) -> Digest:
        return self._write(path, lambda fd: _write_all(fd, memoryview(data)))

    def _write(self, path: str, write: Callable[[int], None]) -> Digest:
        """``write`` a new temporary file beside ``path`` (in a folder reached without
        following a link), fsync it, hash what landed in it (not what was meant to be
        written), then rename it into place: what stood there (a link included) is
        replaced, never written through. Nothing is left behind on failure."""
        folder, name = _split(path)
        with self._folder(folder) as dir_fd:
            tmp = tmp_name(name)
            WRITING.add(tmp)
            try:
                fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | SAFE_FLAGS, 0o644,
                             dir_fd=dir_fd)
                try:
                    os.set_blocking(fd, True)
                    write(fd)
                    os.fsync(fd)
                    digest = _digest_fd(fd)
                finally:
                    os.close(fd)
                os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=dir_fd)
                raise
            finally:
                WRITING.discard(tmp)
        return digest

    @contextlib.contextmanager
    def read(self, path: str) -> Iterator[memoryview]:
        fd = self._open_file(path)
        try:
            with _mapped(fd) as view:
                yield view
        finally:
            os.close(fd)

    def read_head(self, path: str, num_bytes: int) -> bytes:
        with os.fdopen(self._open_file(path), "rb") as f:
            return f.read(num_bytes)

    def digest(self, path: str) -> Digest:
        fd = self._open_file(path)
        try:
            return _digest_fd(fd)
        finally:
            os.close(fd)

    def move(self, path: str, new_path: str) -> None:
        """Rename an entry: a symlink is renamed itself, never what it points to."""
        (folder, name), (new_folder, new_name) = _split(path), _split(new_path)
        with self._folder(folder) as src, self._folder(new_folder) as dst:
            os.rename(name, new_name, src_dir_fd=src, dst_dir_fd=dst)
            os.fsync(src)

    def size(self, path: str) -> int | None:
        """A regular file's (or a folder's) size; None when it is missing.
        NotRegularFileError for anything else, or for a path through one."""
        folder, name = _split(path)
        try:
            if not path:
                return os.stat(self.root).st_size
            with self._folder(folder) as dir_fd:
                mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                if not (stat.S_ISREG(mode.st_mode) or stat.S_ISDIR(mode.st_mode)):
                    raise not_regular(path, name, dir_fd, mode=mode.st_mode)
                return mode.st_size
        except FileNotFoundError:
            return None

    def listdir(self, path: str) -> list[str] | None:
        """The names in a folder; None when it is missing, or not a folder reached
        without following a link (nothing through a link is listed, so nothing through
        it is read or removed)."""
        try:
            with self._folder(path) as fd:
                return os.listdir(fd)
        except (FileNotFoundError, NotRegularFileError):
            return None

    def makedirs(self, path: str) -> None:
        target = self.root
        missing = []
        while not os.path.isdir(target):
            missing.append(target)
            target = os.path.dirname(target)
        os.makedirs(self.root, exist_ok=True)
        for folder in reversed(missing):  # each new entry durable in its parent
            self._sync(os.path.dirname(folder))
        with self._folder(path, create=True):
            pass

    def bucket_exists(self) -> bool:
        return True

    def sync_dir(self, path: str) -> None:
        with self._folder(path) as fd:
            os.fsync(fd)

    @staticmethod
    def _sync(folder: str) -> None:
        fd = os.open(folder or ".", os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def remove(self, path: str) -> None:
        """Remove a regular file; anything else (a link, a FIFO) is NotRegularFileError
        and stays."""
        folder, name = _split(path)
        with self._folder(folder) as dir_fd:
            mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
            if not stat.S_ISREG(mode):
                raise not_regular(path, name, dir_fd, mode=mode)
            os.unlink(name, dir_fd=dir_fd)

    def rmdir(self, path: str) -> None:
        folder, name = _split(path)
        with contextlib.suppress(OSError), self._folder(folder) as dir_fd:
            os.rmdir(name, dir_fd=dir_fd)


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
