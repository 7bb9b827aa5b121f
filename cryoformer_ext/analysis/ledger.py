"""What an analysis run wrote and how long each step took.

Every step records its files here instead of in closures, so that the summary can list every file, the
stale-file removal knows what this run made, and the maps come back to the job in the order they were
written.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Literal

import numpy as np
from pydantic import BaseModel

from cryoformer_ext.formats.atomic import write_mrc


class MapRecord(BaseModel):
    name: str
    path: Path
    kind: Literal["consensus", "kmeans", "pc", "flexibility", "attention", "mask", "occupancy"]
    index: int | None = None  # k-means class (0-based) or step in a PC series (0-based); PC number in `pc`
    latent: list[float] | None = None  # latent the map was decoded at (None: flexibility / homogeneous)
    pc: int | None = None  # 1-based principal component of a "pc" map


class OutputLedger:
    """The files of one analysis folder, in the order they were written; maps at ``apix`` Å/voxel."""

    def __init__(self, out_dir: Path, apix: float) -> None:
        self.out_dir = Path(out_dir)
        self.apix = apix
        self.written: list[Path] = []
        self.maps: list[MapRecord] = []
        self.plots: list[Path] = []
        self.timings: dict[str, float] = {}

    def record(self, path: Path) -> Path:
        self.written.append(Path(path).resolve())
        return Path(path)

    def add_map(self, name: str, rel: str, kind: str, vol: np.ndarray, *, index: int | None = None,
                latent: np.ndarray | None = None, pc: int | None = None) -> MapRecord:
        path = self.record(write_mrc(self.out_dir / rel, vol, self.apix))
        m = MapRecord(name=name, path=path.resolve(), kind=kind, index=index,
                      latent=None if latent is None else [float(x) for x in latent], pc=pc)
        self.maps.append(m)
        return m

    def add_plot(self, path: Path) -> None:
        self.plots.append(self.record(path))

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        """Adds the wall time of the block to step ``name`` (summed when a step runs in parts)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0

    def relative(self, path: Path) -> str:
        return Path(path).resolve().relative_to(self.out_dir.resolve()).as_posix()
