"""Lazy particle images from MRC stacks, addressed as (stack file, 0-based index) per particle.

Both RELION (``000012@Extract/job007/stack.mrcs``, 1-based) and cryoSPARC (``blob/path`` +
0-based ``blob/idx``) name particles this way; the readers convert to 0-based indices and hand a
:class:`MrcStackSource` to the engine. Files are memory-mapped and opened once, so a minibatch costs
only the pages it touches, whatever the size of the dataset.
"""

from __future__ import annotations

import os
from pathlib import Path

import mrcfile
import numpy as np


class ImageStackError(ValueError):
    """A stack file is missing, unreadable or does not hold the requested image."""


class MrcStackSource:
    """:class:`cryoformer.data.ImageSource` over many MRC stacks (memory-mapped, opened on demand)."""

    def __init__(self, paths: list[str | os.PathLike], indices: np.ndarray, *, check: bool = True,
                 what: str = "particle", origin: str | None = None, first_line: int | None = None):
        files = [Path(p) for p in paths]
        uniq, inverse = np.unique(np.asarray([str(p) for p in files], dtype=object), return_inverse=True)
        self._files = [Path(u) for u in uniq]
        self._file_of = inverse.astype(np.int64)
        self._index = np.asarray(indices, dtype=np.int64)
        if len(self._index) != len(self._file_of):
            raise ValueError("one index per particle is needed")
        self._maps: dict[int, np.ndarray] = {}
        self._what = what
        # where particle i was listed (the STAR or .cs file, and the file line of particle 0): error messages
        self._origin, self._first_line = origin, first_line
        self._box: int | None = None
        if check:
            self.check()

    def __getstate__(self) -> dict:
        # pickled for data-parallel workers: paths and indices only, each worker maps the stacks itself
        return {**self.__dict__, "_maps": {}}

    def _open(self, k: int) -> np.ndarray:
        arr = self._maps.get(k)
        if arr is None:
            path = self._files[k]
            if not path.exists():
                raise ImageStackError(f"{path}: image stack file not found")
            try:
                mrc = mrcfile.mmap(path, mode="r", permissive=True)
            except Exception as err:  # noqa: BLE001 - mrcfile raises several types
                raise ImageStackError(f"{path}: cannot read as MRC ({err})") from None
            if mrc.data is None:
                raise ImageStackError(f"{path}: MRC file has no data block")
            arr = mrc.data
            if arr.ndim == 2:
                arr = arr[None]
            self._maps[k] = arr
        return arr

    def check(self) -> None:
        """Open every stack once: missing files, non-square or mixed boxes, indices out of range."""
        boxes: dict[int, list[Path]] = {}
        for k, path in enumerate(self._files):
            arr = self._open(k)
            if arr.shape[-1] != arr.shape[-2]:
                raise ImageStackError(f"{path}: images are {arr.shape[-1]}x{arr.shape[-2]}, not square")
            sel = self._index[self._file_of == k]
            if len(sel) and (sel.min() < 0 or sel.max() >= arr.shape[0]):
                bad = int(sel.max() if sel.max() >= arr.shape[0] else sel.min())
                raise ImageStackError(
                    f"{path}: {self._what} refers to image {bad + 1} (1-based) but the stack holds {arr.shape[0]}")
            boxes.setdefault(int(arr.shape[-1]), []).append(path)
        if len(boxes) > 1:
            desc = "; ".join(f"box {b}: {ps[0]}" + (f" and {len(ps) - 1} more" if len(ps) > 1 else "")
                             for b, ps in boxes.items())
            raise ImageStackError(f"stacks have different box sizes ({desc})")
        if boxes:
            self._box = next(iter(boxes))

    @property
    def box(self) -> int:
        if self._box is None:
            self._box = int(self._open(int(self._file_of[0])).shape[-1])
        return self._box

    def __len__(self) -> int:
        return len(self._index)

    def read(self, indices: np.ndarray) -> np.ndarray:
        indices = np.asarray(indices, dtype=np.int64)
        out = np.empty((len(indices), self.box, self.box), dtype=np.float32)
        files = self._file_of[indices]
        for k in np.unique(files):
            sel = np.nonzero(files == k)[0]
            arr = self._open(int(k))
            out[sel] = arr[self._index[indices[sel]]]
        bad = ~np.isfinite(out).all(axis=(1, 2))
        if bad.any():  # checked per minibatch: free, where a scan of every stack up front would not be
            raise self._not_finite(int(indices[np.argmax(bad)]))
        return out

    def _not_finite(self, i: int) -> ImageStackError:
        where = f"{self._what} {i + 1}"
        if self._first_line is not None:
            where += f" (line {self._first_line + i})"
        if self._origin:
            where = f"{self._origin}: {where}"
        stack = self._files[int(self._file_of[i])]
        return ImageStackError(f"{where}: image {int(self._index[i]) + 1} of {stack} holds NaN or infinite pixel "
                               "values (a damaged stack or a failed extraction): remove this particle or re-extract")

    @property
    def files(self) -> list[Path]:
        return list(self._files)
