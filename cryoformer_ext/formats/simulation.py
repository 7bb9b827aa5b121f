"""Write a simulated dataset the way a RELION project holds real data, plus its ground truth.

The demo, the tests and the benchmarks all go through these files, so the whole path a user's data
takes (STAR parsing, lazy stack reading, CTF and pose conversion) is exercised on data whose answer
is known.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from cryoformer.simulate import SimulatedData, true_volume

from cryoformer_ext.formats.atomic import atomic_write_text, save_npy, write_mrc
from cryoformer_ext.formats.star import write_simulated_star

TRUE_T_COLUMN = "rlnCryoformerTrueConformation"


def write_simulated(sim: SimulatedData, out_dir: str | os.PathLike, *, n_truth_maps: int = 5,
                    star_name: str = "particles.star", stack_name: str = "particles.mrcs",
                    image_prefix: str | None = None) -> Path:
    """Write ``particles.mrcs``, ``particles.star`` (RELION 3.1), ``truth/`` maps and latent.

    ``image_prefix`` is the folder written into ``rlnImageName`` (relative to the RELION project
    directory); by default the STAR refers to the stack by its name alone, so the project directory
    is ``out_dir``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_mrc(out_dir / stack_name, sim.images, sim.pixel_size_A)
    ref = stack_name if image_prefix is None else f"{image_prefix.rstrip('/')}/{stack_name}"
    star = write_simulated_star(out_dir / star_name, rot=sim.rot, shift_px=sim.shift_px, ctf=sim.ctf,
                                pixel_size_A=sim.pixel_size_A, box=sim.box, stack_path=ref,
                                extra_columns={TRUE_T_COLUMN: sim.conformation})
    truth = out_dir / "truth"
    save_npy(truth / "conformation.npy", sim.conformation.astype(np.float32))
    ts = np.linspace(0.0, 1.0, n_truth_maps)
    if len(np.unique(sim.conformation)) <= 10:  # discrete states: one map per state
        ts = np.unique(sim.conformation)
    for i, t in enumerate(ts):
        write_mrc(truth / f"state_{i + 1:02d}.mrc", true_volume(float(t), sim.box), sim.pixel_size_A)
    atomic_write_text(truth / "truth.json", json.dumps({
        "conformations": [float(t) for t in ts],
        "maps": [f"state_{i + 1:02d}.mrc" for i in range(len(ts))],
        "n_particles": int(len(sim.conformation)), "box": sim.box, "pixel_size_A": sim.pixel_size_A,
        "noise_sigma": sim.noise_sigma}, indent=2))
    return star
