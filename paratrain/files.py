"""Paths checked before any worker starts, and never by a call that can block: what a path is
comes from os.stat (opening a FIFO for reading waits for a writer), small text files are read
whole under a size bound, and the errors are one line (ValueError) for the caller to prefix
with its flag."""

from __future__ import annotations

import os
import stat

KINDS = ((stat.S_ISREG, "regular file"), (stat.S_ISDIR, "folder"), (stat.S_ISFIFO, "FIFO (named pipe)"),
         (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket"))


def kind(mode: int) -> str:
    """What a stat mode is, in words: regular file, folder, FIFO (named pipe), character device..."""
    return next((name for test, name in KINDS if test(mode)), "special file")


def stat_existing(path: str) -> os.stat_result:
    """os.stat of `path`, links followed; ValueError naming a missing path or a dangling link."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise ValueError(f"{path!r} is a symbolic link to {os.readlink(path)!r}, which does not exist") from None
        raise ValueError(f"no such file {path!r}") from None
    except OSError as e:
        raise ValueError(f"cannot read {path!r} ({e.strerror})") from None


def regular_file(path: str, what: str) -> os.stat_result:
    """os.stat of `path` if it is a regular file (links followed); ValueError otherwise, saying
    what it is instead (missing, a dangling link, a folder, a device, a FIFO, a socket)."""
    st = stat_existing(path)
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{path!r} is a {kind(st.st_mode)}, not a {what}")
    return st


def read_small_text(path: str, limit: int, what: str) -> str:
    """The UTF-8 text of the regular file `path` of at most `limit` bytes; ValueError otherwise."""
    st = regular_file(path, what)
    if st.st_size > limit:
        raise ValueError(f"{path!r} holds {st.st_size:,} bytes; a {what} has at most {limit:,}")
    try:  # O_NONBLOCK: should the path have become a FIFO since the stat, opening it does not wait
        with os.fdopen(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb") as fh:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                raise ValueError(f"{path!r} is not a regular file, not a {what}")
            data = fh.read(limit + 1)
    except OSError as e:
        raise ValueError(f"cannot read {path!r} ({e.strerror})") from None
    if len(data) > limit:
        raise ValueError(f"{path!r} holds more than {limit:,} bytes; a {what} has at most {limit:,}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path!r} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                         f"a {what} is UTF-8") from None
