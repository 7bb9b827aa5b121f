"""The ``select_classes`` mode of the External job: a particle subset as a RELION pipeline node.

Give an External job the ``particles.star`` of a finished cryoFormer job as *Input particles* and the
parameter ``select_classes`` (e.g. ``1,3`` or ``2-4``; k-means classes, 1-based as in ``rlnClassNumber``
and ``kmeans/class_001.mrc``). Optional ``select_invert yes`` keeps the other classes. Instead of training,
the job writes ``particles.star`` with the chosen particles (every column and the optics table kept) and
declares it as its particles output node, so the next job (Refine3D, Class3D ...) can take it as input.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from cryoformer_ext.config import JobConfig, parse_yes_no
from cryoformer_ext.formats.star import CLASS_LABEL, StarFileError, read_particles_star
from cryoformer_ext.formats.subsets import write_star_subset
from cryoformer_ext.jobdir import PARTICLES_FILE

from . import nodes as _nodes
from .usage import UsageError

LABEL = "select_classes"
INVERT_LABEL = "select_invert"
PARTICLES_OUT = PARTICLES_FILE


def wanted(opts: dict[str, str | None]) -> bool:
    return LABEL in opts


def _classes(value: str | None) -> list[int]:
    from cryoformer_ext.jobdir import JobFilesError, parse_int_list

    try:
        return parse_int_list(value or "", LABEL)
    except JobFilesError as err:
        raise UsageError(f"parameter {LABEL}: {err}") from None


def _invert(value: str | None, present: bool) -> bool:
    """``select_invert`` yes/no (the job parameters' rule); a bare label (empty value) means yes."""
    return parse_yes_no(value, INVERT_LABEL, "External job parameters") if present else False


def class_mask(particles: pd.DataFrame, classes: list[int], source: str) -> np.ndarray:
    """Rows whose ``rlnClassNumber`` is one of ``classes``."""
    if CLASS_LABEL not in particles.columns:
        raise StarFileError(f"{source}: has no {CLASS_LABEL} column; give the particles.star of a cryoFormer job "
                            "(it holds the k-means class of every particle)")
    numbers = pd.to_numeric(particles[CLASS_LABEL], errors="coerce").to_numpy()
    present = sorted({int(c) for c in numbers[np.isfinite(numbers)]})
    missing = [c for c in classes if c not in present]
    if missing:
        raise StarFileError(f"{source}: no particle has {CLASS_LABEL} {', '.join(map(str, missing))} "
                            f"(classes present: {', '.join(map(str, present))})")
    return np.isin(numbers, classes)


def run_select(opts: dict[str, str | None], out_dir: Path, version, log) -> str:
    """Write the subset and its output node; returns the exit file to write."""
    in_parts = opts.get("in_parts")
    if not in_parts:
        raise UsageError(f"{LABEL}: set 'Input particles' (--in_parts) to the particles.star of a cryoFormer job")
    ignored = [k for k in opts if k in JobConfig.model_fields]
    if ignored:
        log.out(f"note: {LABEL} only selects particles; ignoring training parameter(s) {', '.join(ignored)}")
    classes = _classes(opts.get(LABEL))
    invert = _invert(opts.get(INVERT_LABEL), INVERT_LABEL in opts)
    star = read_particles_star(in_parts, check_images=False)
    mask = class_mask(star.particles, classes, in_parts)
    if invert:
        mask = ~mask
    idx = np.flatnonzero(mask)
    if len(idx) == 0:
        raise StarFileError(f"{in_parts}: the selection ({'not ' if invert else ''}classes "
                            f"{','.join(map(str, classes))}) contains no particles")
    out = write_star_subset(in_parts, idx, out_dir / PARTICLES_OUT)
    log.out(f"selected {len(idx)} of {len(mask)} particles ({'all but ' if invert else ''}{CLASS_LABEL} "
            f"{','.join(map(str, classes))}) -> {out}")
    node = os.path.relpath(Path(out).resolve(), Path.cwd().resolve())
    _nodes.write_output_nodes(out_dir, [(node, "particles")], version)
    return _nodes.EXIT_SUCCESS
