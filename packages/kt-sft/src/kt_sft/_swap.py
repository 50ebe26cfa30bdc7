"""Crash-safe directory publication: write under a temporary name, then swap into place.

:func:`swap_into_place` publishes a complete directory ``tmp`` as ``target``. When ``target``
exists, the two are exchanged in one atomic ``renameat2(RENAME_EXCHANGE)`` (Linux, on the
file systems that support it), so at every instant ``target`` is the old complete version or
the new one. Elsewhere it falls back to two renames, ``target -> .<name>.old-<pid>`` then
``tmp -> target``; a kill between them leaves the old complete copy under that name, and
:func:`recover` (run by :func:`clean_leftovers`) renames it back. :func:`clean_leftovers` then
removes what interrupted writes left behind in a directory: temporary folders of unfinished
writes and superseded old copies.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import sys
from pathlib import Path

__all__ = ["clean_leftovers", "fsync_tree", "recover", "swap_into_place"]

# Old copies parked during a two-rename swap: ".<name>.old-<pid>" (this module),
# ".tmp-old-<name>-<pid>" and ".<name>.old-<random>/<name>" (earlier kt-sft versions).
_OLD_RE = re.compile(r"^\.(?P<name>.+)\.old-[^/]+$|^\.tmp-old-(?P<legacy>.+)-\d+$")
# Unfinished writes: ".tmp-<name>-<random>" (train artifacts), ".<name>.tmp-<random>" (adapters;
# also nested, "..tmp-checkpoint-3-xyz.tmp-abc" from an adapter written into a checkpoint's
# temporary folder).
_TMP_RE = re.compile(r"^\.(tmp-.+|.+\.tmp-.+)$")

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_renameat2 = None
if sys.platform.startswith("linux"):
    with contextlib.suppress(OSError, AttributeError):
        _libc = ctypes.CDLL(None, use_errno=True)
        _renameat2 = _libc.renameat2
        _renameat2.argtypes = [
            ctypes.c_int,
            ctypes.c_char_p,
            ctypes.c_int,
            ctypes.c_char_p,
            ctypes.c_uint,
        ]
        _renameat2.restype = ctypes.c_int


def _exchange(a: Path, b: Path) -> bool:
    """Atomically exchange ``a`` and ``b``; False when this system or file system cannot."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_tree(root: Path) -> None:
    """Flush every file under ``root`` and the folders themselves to disk."""
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(Path(dirpath))


def swap_into_place(tmp: Path, target: Path) -> None:
    """Publish the complete directory ``tmp`` as ``target`` (replacing an existing one).

    ``tmp`` and ``target`` share a parent. Whatever moment the process dies, ``target`` or its
    parked old copy (restored by :func:`recover`) is a complete version.
    """
    tmp, target = Path(tmp), Path(target)
    if not target.exists():
        os.replace(tmp, target)
    elif _exchange(tmp, target):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old version
    else:
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        if old.exists():
            shutil.rmtree(old)
        os.replace(target, old)
        try:
            os.replace(tmp, target)
        except BaseException:
            os.replace(old, target)
            raise
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(target.parent)


def recover(parent: Path) -> list[Path]:
    """Put back old copies a kill left parked mid-swap (their target is missing); returns the
    restored targets. Parked copies whose target exists are left for :func:`clean_leftovers`."""
    restored: list[Path] = []
    if not parent.is_dir():
        return restored
    for entry in sorted(parent.iterdir()):
        m = _OLD_RE.match(entry.name)
        if not m or not entry.is_dir():
            continue
        name = m.group("name") or m.group("legacy")
        target = parent / name
        parked = entry / name if (entry / name).is_dir() else entry
        if not target.exists():
            os.replace(parked, target)
            restored.append(target)
    return restored


def clean_leftovers(parent: Path) -> list[Path]:
    """:func:`recover`, then remove the temporary folders and files of interrupted writes and
    superseded parked copies in ``parent``; returns what was removed."""
    removed: list[Path] = []
    if not parent.is_dir():
        return removed
    recover(parent)
    for entry in sorted(parent.iterdir()):
        if not (_OLD_RE.match(entry.name) or _TMP_RE.match(entry.name)):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed
