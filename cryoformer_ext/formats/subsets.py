"""Particle subsets in the input's own format, for the next refinement.

* RELION: the STAR file's rows at the chosen indices, **every column** unchanged, the optics table
  as it was (all groups, like RELION's own Subset selection) and the same format/version line.
* cryoSPARC: the ``.cs`` rows at the chosen indices with **every field** (uid included), plus a ``.csg``
  manifest for *Import Result Group*. ``blob/path`` values are kept as they were (relative to the
  project directory), so import the group into the project the particles came from.

The indices are rows of the file in order (0-based), which is the particles' input order when the file
is the one the job was trained on or one it wrote (``particles.star``, ``cryoformer_particles.cs``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from cryoformer_ext.formats import cs as cs_io
from cryoformer_ext.formats.star import read_particles_star, write_particles_star


class SubsetError(ValueError):
    """The particle file does not fit the selection; the message names the file."""


def _check(indices: np.ndarray, n_rows: int, source: Path) -> np.ndarray:
    idx = np.asarray(indices, dtype=np.int64).ravel()
    if idx.size and (idx.min() < 0 or idx.max() >= n_rows):
        raise SubsetError(f"{source}: has {n_rows} particles but the selection refers to particle {int(idx.max())} "
                          "(0-based); is this the particle file the job was trained on?")
    return idx


def star_row_count(path: str | os.PathLike) -> int:
    return read_particles_star(path, check_images=False).record.n_particles


def write_star_subset(source: str | os.PathLike, indices: np.ndarray, out_path: str | os.PathLike) -> Path:
    """Rows ``indices`` of the particle STAR ``source`` -> ``out_path`` (every column, optics table kept)."""
    source = Path(source)
    star = read_particles_star(source, check_images=False)
    idx = _check(indices, star.record.n_particles, source)
    rows = star.particles.iloc[idx].reset_index(drop=True)
    if star.record.relion_format == "3.0":
        return write_particles_star(out_path, None, rows, version=None, particles_block=star.record.particles_block)
    return write_particles_star(out_path, star.optics, rows, version=star.record.version or 30001)


def cs_row_count(path: str | os.PathLike) -> int:
    return len(cs_io.load_cs(path))


def write_cs_subset(source: str | os.PathLike, indices: np.ndarray, out_dir: str | os.PathLike, stem: str, *,
                    title: str, description: str = "") -> tuple[Path, Path]:
    """Rows ``indices`` of the ``.cs`` ``source`` -> ``<out_dir>/<stem>.cs`` + ``.csg`` (every field kept)."""
    source = Path(source)
    dset = cs_io.load_cs(source)
    idx = _check(indices, len(dset), source)
    return cs_io.write_group(out_dir, stem, dset.take(idx), group_name="particles", group_type="particle",
                             title=title, description=description)
