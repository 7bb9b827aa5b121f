"""Atomic file output: every result file appears complete or not at all.

RELION and cryoSPARC users rerun and continue jobs; a crash half-way through writing a STAR file or a
map must never leave something that a downstream job would read as valid. So everything is written to
a temporary name in the same folder and renamed into place (rename is atomic on POSIX). The final file
gets the mode any other program's output would get (0666 minus the umask), not ``mkstemp``'s 0600, so
the other members of a shared RELION or cryoSPARC project can read it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

import mrcfile
import numpy as np


def default_file_mode() -> int:
    """0666 minus the process umask: the mode ``open()`` gives a new file (``mkstemp`` ignores the umask)."""
    try:
        with open("/proc/self/status") as fh:  # Linux: reads the umask without changing it
            for line in fh:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, default_file_mode())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def save_npy(path: str | os.PathLike, array: np.ndarray) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, array)
    return Path(path)


def write_mrc(path: str | os.PathLike, data: np.ndarray, voxel_size_A: float) -> Path:
    """Write a map or stack as float32 MRC with the voxel size in the header (atomically)."""
    arr = np.ascontiguousarray(data, dtype=np.float32)
    with atomic_path(path) as tmp:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(arr)
            mrc.voxel_size = float(voxel_size_A)
            if arr.ndim == 3 and Path(path).suffix == ".mrcs":
                mrc.set_image_stack()
            mrc.update_header_stats()
    return Path(path)


def touch(path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    return path
