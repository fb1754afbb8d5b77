"""Opening files in a run directory that others may write (a shared filesystem, a
colleague): a symlink is never followed, and a FIFO, socket or device is never opened
(opening a FIFO blocks until a writer comes; a device may act on being opened). Only
regular files are opened, and the check is made on what was opened (``fstat``), so an
entry swapped in between is caught too.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat

# The flags every open here adds: no link in the last component, no blocking open, no
# controlling terminal, no descriptor leaked into a child process.
SAFE_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
FOLDER_FLAGS = os.O_RDONLY | os.O_DIRECTORY | SAFE_FLAGS


class NotRegularFileError(OSError):
    """A symlink, FIFO, socket or device where hardtrain expects one of its regular
    files (or anything but a real folder where it expects a folder): never followed,
    opened, written or deleted. The message names the path and what is there; ``kind``
    is what is there alone ("FIFO", "symlink to '/etc/passwd'"), ``path`` where."""

    def __init__(self, message: str, kind: str = "", path: str = "") -> None:
        super().__init__(message)
        self.kind = kind
        self.path = path


def describe(mode: int) -> str:
    """What kind of entry ``mode`` (``st_mode``) is, in words."""
    for test, name in ((stat.S_ISLNK, "symlink"), (stat.S_ISFIFO, "FIFO"),
                       (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISDIR, "folder"),
                       (stat.S_ISREG, "regular file")):
        if test(mode):
            return name
    return f"unknown file type {stat.S_IFMT(mode):o}"


def not_regular(shown: str, name: str, dir_fd: int | None, *, expected: str = "a regular file",
                mode: int | None = None) -> NotRegularFileError:
    """The error for ``name`` (in ``dir_fd``), shown as ``shown``: what stands there, and a
    symlink's target (read, never followed)."""
    try:
        mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode if mode is None else mode
    except OSError as e:
        return NotRegularFileError(f"{shown}: not {expected} ({type(e).__name__}: {e})",
                                   "gone", shown)
    kind = describe(mode)
    if stat.S_ISLNK(mode):
        with contextlib.suppress(OSError):
            kind += f" to {os.readlink(name, dir_fd=dir_fd)!r}"
    return NotRegularFileError(f"{shown}: not {expected}: {kind}", kind, shown)


def open_regular(name: str, flags: int, *, dir_fd: int | None = None, shown: str | None = None,
                 mode: int = 0o644) -> int:
    """``os.open`` for a regular file only: a symlink (in the last component), FIFO, socket,
    device or folder is ``NotRegularFileError``, found without blocking and, but for a
    race, without opening it. The descriptor returned blocks as usual."""
    shown = name if shown is None else shown
    try:
        found = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
    except FileNotFoundError:
        if not flags & os.O_CREAT:
            raise
    else:
        if not stat.S_ISREG(found):
            raise not_regular(shown, name, dir_fd, mode=found)
    try:
        fd = os.open(name, flags | SAFE_FLAGS, mode, dir_fd=dir_fd)
    except OSError as e:  # swapped for a symlink (ELOOP) or a lone FIFO (ENXIO) meanwhile
        if e.errno in (errno.ELOOP, errno.ENXIO):
            raise not_regular(shown, name, dir_fd) from None
        raise
    try:
        opened = os.fstat(fd).st_mode
        if not stat.S_ISREG(opened):
            raise not_regular(shown, name, dir_fd, mode=opened)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd

