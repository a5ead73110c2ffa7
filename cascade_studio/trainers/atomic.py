"""Crash-safe file writes: a reader sees either the old file or the complete new one, never half of one.

Every writer follows the same recipe: write a temporary file in the *same directory* (so ``os.replace`` is a
rename within one filesystem, which POSIX makes atomic), flush and ``fsync`` it (so the data is on disk before the
name points at it), ``os.replace`` it over the target, then ``fsync`` the directory (so the rename itself survives
a power cut). See https://lwn.net/Articles/457667/ for why each step is needed.

A full disk (ENOSPC) or a file-size limit (EFBIG, ``ulimit -f``) becomes a :class:`DiskFullError` that names the
path and the free space; the temporary file is removed and the previous file is left untouched.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import IO, Callable, Mapping, Optional, Union

from .. import diskspace

PathLike = Union[str, os.PathLike]

_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EFBIG)
# Rust I/O errors (safetensors) surface as "... (os error 28)" inside a non-OSError exception.
_RUST_OS_ERROR = re.compile(r"os error (\d+)")
_COPY_CHUNK = 8 * 1024 * 1024


def _read_umask() -> int:
    # mkstemp creates files 0600; finished files should get the usual 0666 & ~umask so that other tools
    # (the studio UI, `mlflow ui`, a second user) can read them. os.umask can only be read by setting it.
    current = os.umask(0)
    os.umask(current)
    return current


FILE_MODE = 0o666 & ~_read_umask()  # what a finished file gets (not mkstemp's 0600)


class DiskFullError(OSError):
    """A write failed because the disk is full or a file-size limit was hit; the old file is untouched."""


def free_space(path: PathLike) -> Optional[int]:
    """Free bytes on the filesystem holding ``path`` (or its nearest existing parent); None if unknown."""
    return diskspace.free_space(path)


def disk_full_error(
    code: int, path: Optional[PathLike], kept: str = "The previous file was left untouched."
) -> DiskFullError:
    """Build the user-facing :class:`DiskFullError` for ``path`` (``code`` is ENOSPC or EFBIG).

    ``kept`` tells the user what survived the failed write. The free space quoted is that of the filesystem
    holding ``path`` (named by its mount point); when the failing library did not say which file it was writing
    (``path`` None), no filesystem is guessed.
    """
    if code == errno.EFBIG:
        reason = "the file-size limit of this process was reached (see `ulimit -f`)"
    else:
        reason = "the disk is full"
    if path is None:
        message = (
            f"A write failed: {reason}, and the library writing did not say which file. {kept} Check the free "
            "space where the workspace, the cache (cache.dir) and the exports (export.dir) live, free some (for "
            "example delete old checkpoints or the encoded cache) or move them to a larger disk, then resume the run."
        )
        return DiskFullError(code, message)
    message = (
        f"Could not write {path}: {reason}; {diskspace.describe_free_space(Path(path).parent)}. {kept} "
        "Free some space there (for example delete old checkpoints or the "
        "encoded cache in the workspace) or move the workspace to a larger disk, then resume the run."
    )
    return DiskFullError(code, message, str(path))


def as_disk_full(
    exc: BaseException, path: Optional[PathLike], kept: str = "The previous file was left untouched."
) -> Optional[DiskFullError]:
    """Return a :class:`DiskFullError` if ``exc`` means "out of space", else None.

    Recognises ``OSError`` with ENOSPC/EFBIG and libraries that wrap the OS error in their own exception type
    but keep the Rust-style "(os error N)" text (safetensors does).
    """
    if isinstance(exc, DiskFullError):
        return exc
    if isinstance(exc, OSError) and exc.errno in _DISK_FULL_ERRNOS:
        return disk_full_error(exc.errno, path, kept)
    match = _RUST_OS_ERROR.search(str(exc))
    if match and int(match.group(1)) in _DISK_FULL_ERRNOS:
        return disk_full_error(int(match.group(1)), path, kept)
    return None


def fsync_dir(directory: PathLike) -> None:
    """Flush a directory entry to disk so a rename inside it survives a power cut (no-op where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # e.g. Windows cannot open directories; the rename is still atomic there
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems (tmpfs variants, network mounts) refuse fsync on directories
    finally:
        os.close(fd)


def _atomic_write(path: PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Run ``write(file)`` on a temp file next to ``path`` and atomically move it into place."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, FILE_MODE)
        os.replace(tmp_name, target)
    except BaseException as exc:  # also KeyboardInterrupt: never leave a temp file behind
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        translated = as_disk_full(exc, target)
        if translated is not None and translated is not exc:
            raise translated from exc
        raise
    fsync_dir(target.parent)
    return target


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path. Raises :class:`DiskFullError` when out of space."""
    return _atomic_write(path, lambda handle: handle.write(data))


def atomic_write_text(path: PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (UTF-8 by default); returns the path."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_save_safetensors(
    tensors: Mapping[str, "object"], path: PathLike, metadata: Optional[Mapping[str, str]] = None
) -> Path:
    """Save a dict of torch tensors as safetensors, atomically.

    Serialises in memory first (``safetensors.torch.save``) so that write errors come back as plain OSErrors
    with an errno we can translate; that doubles peak memory, which is fine for adapter-sized files.
    """
    from safetensors.torch import save  # heavy import kept local: atomic text writes must not pull in torch

    payload = save(dict(tensors), metadata=dict(metadata) if metadata is not None else None)
    return atomic_write_bytes(path, payload)


def atomic_copy(src: PathLike, dst: PathLike) -> Path:
    """Copy ``src`` to ``dst`` atomically (chunked, so large files do not need to fit in memory)."""
    source = Path(src)

    def copy(handle: IO[bytes]) -> None:
        with open(source, "rb") as reader:
            shutil.copyfileobj(reader, handle, _COPY_CHUNK)

    result = _atomic_write(dst, copy)
    shutil.copymode(source, result)
    return result
