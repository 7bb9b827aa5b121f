"""Particle images of given maps made by RELION's own projector (``relion_project --ctf``).

Kind (e) is projected by RELION rather than by the project's renderer, so that a method is not scored on
images made by the same code that renders its training loss (interpolation, CTF and shift conventions
all come from another program).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from cryoformer.simulate import Acquisition


def relion_project_states(maps: np.ndarray, states: np.ndarray, acq: Acquisition, pixel_size_A: float,
                          *, ctf: bool = True) -> np.ndarray:
    """Noise-free images (N, D, D), particle ``i`` the projection of ``maps[states[i]]`` at its pose,
    shift and (with ``ctf``) CTF; one ``relion_project`` call per state."""
    import mrcfile

    from cryoformer_ext.formats.atomic import write_mrc
    from cryoformer_ext.formats.star import write_simulated_star

    exe = shutil.which("relion_project")
    if exe is None:
        raise FileNotFoundError("relion_project is not on PATH (RELION 3.1+ is needed for the atomic kind)")
    box = maps.shape[-1]
    out = np.zeros((len(states), box, box), np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        for s in np.unique(states):
            idx = np.flatnonzero(states == s)
            vol, star, stem = Path(tmp) / f"s{s}.mrc", Path(tmp) / f"s{s}.star", Path(tmp) / f"proj{s}"
            write_mrc(vol, maps[s], pixel_size_A)
            write_simulated_star(star, rot=acq.rot[idx], shift_px=acq.shift_px[idx], ctf=_take(acq, idx),
                                 pixel_size_A=pixel_size_A, box=box, stack_path="unused.mrcs")
            cmd = [exe, "--i", str(vol), "--ang", str(star), "--o", str(stem)] + (["--ctf"] if ctf else [])
            run = subprocess.run(cmd, capture_output=True, text=True)
            stack = stem.with_suffix(".mrcs")
            if run.returncode != 0 or not stack.exists():
                raise RuntimeError(f"relion_project failed on state {s} ({run.returncode}): {run.stderr[-2000:]}")
            imgs = mrcfile.read(stack)
            if imgs.shape != (len(idx), box, box):
                raise RuntimeError(f"relion_project wrote {imgs.shape} for {len(idx)} particles of state {s}")
            out[idx] = imgs
    return out


def _take(acq: Acquisition, idx: np.ndarray):
    from cryoformer.data import CTFParams

    return CTFParams(*[getattr(acq.ctf, f)[idx] for f in CTFParams.FIELDS])
