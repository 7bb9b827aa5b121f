"""One suite dataset on disk: what both methods read, and the ground truth the scores need.

Layout of a dataset folder:
* ``particles.star`` + ``particles.mrcs`` (RELION 3.1, poses and CTF): cryoFormer's input;
* ``pose.pkl`` (rot, trans = shift / D) and ``ctf.pkl`` ((N, 9) D, Apix, dfU, dfV, dfAng, kV, Cs, Q0,
  phase): cryoDRGN's, next to the same stack;
* ``truth/truth.json`` (:class:`SuiteTruth`), ``truth/coords.npy`` (N, k) conformation coordinates,
  ``truth/states.npy`` (N,) state (or bin) index, ``truth/state_XX.mrc`` the true map of every state.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
from pydantic import BaseModel

from cryoformer.simulate import SimulatedData


class SuiteTruth(BaseModel):
    """Ground truth of one dataset, as the scorer reads it."""

    key: str                       # e.g. "a_hinge_snr0.1"
    kind: str                      # letter a-e
    name: str
    description: str
    n: int
    box: int
    pixel_size_A: float
    snr: float
    noise_sigma: float
    seed: int
    renderer: str                  # "analytic" (the project's) or "relion_project"
    coord_names: list[str]
    ordered: bool                  # the coordinates are ordered (|Spearman| and R² make sense)
    discrete: bool                 # particles sit exactly on the states (else: states are bins)
    state_coords: list[list[float]]
    state_maps: list[str]
    moving_mass_fraction: float


def write_dataset(out: Path, sim: SimulatedData, coords: np.ndarray, states: np.ndarray,
                  state_maps: np.ndarray, truth: SuiteTruth) -> Path:
    """Write the particles for both methods and the truth; returns the folder."""
    from cryoformer_ext.formats.atomic import atomic_write_text, save_npy, write_mrc
    from cryoformer_ext.formats.star import write_simulated_star

    out.mkdir(parents=True, exist_ok=True)
    write_mrc(out / "particles.mrcs", sim.images, sim.pixel_size_A)
    write_simulated_star(out / "particles.star", rot=sim.rot, shift_px=sim.shift_px, ctf=sim.ctf,
                         pixel_size_A=sim.pixel_size_A, box=sim.box, stack_path="particles.mrcs")
    _atomic_pickle(out / "pose.pkl", (sim.rot.astype(np.float32), (sim.shift_px / sim.box).astype(np.float32)))
    _atomic_pickle(out / "ctf.pkl", cryodrgn_ctf(sim))
    save_npy(out / "truth" / "coords.npy", np.asarray(coords, np.float32).reshape(len(coords), -1))
    save_npy(out / "truth" / "states.npy", np.asarray(states, np.int64))
    for name, vol in zip(truth.state_maps, state_maps):
        write_mrc(out / "truth" / name, vol, sim.pixel_size_A)
    atomic_write_text(out / "truth" / "truth.json", truth.model_dump_json(indent=2))
    return out


def cryodrgn_ctf(sim: SimulatedData) -> np.ndarray:
    c, n = sim.ctf, len(sim.ctf)
    return np.stack([np.full(n, sim.box), np.full(n, sim.pixel_size_A), c.defocus_u_A, c.defocus_v_A,
                     c.defocus_angle_deg, c.voltage_kv, c.cs_mm, c.amp_contrast, c.phase_shift_deg],
                    axis=1).astype(np.float32)


def _atomic_pickle(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        pickle.dump(obj, fh)
    tmp.replace(path)


class LoadedTruth:
    """A dataset's truth in memory: coordinates, states, state maps, and the truth map of any particle."""

    def __init__(self, folder: Path):
        path = folder / "truth" / "truth.json"
        if not path.exists():
            raise FileNotFoundError(f"{path}: no truth record (not a suite dataset? build it with bench/suite/build.py)")
        self.record = SuiteTruth.model_validate(json.loads(path.read_text()))
        self.coords = np.load(folder / "truth" / "coords.npy").astype(np.float64)
        self.states = np.load(folder / "truth" / "states.npy")
        import mrcfile

        self.state_maps = np.stack([mrcfile.read(folder / "truth" / m).astype(np.float32)
                                    for m in self.record.state_maps])
        if len(self.coords) != self.record.n or len(self.states) != self.record.n:
            raise ValueError(f"{folder / 'truth'}: {len(self.coords)} coordinates, {len(self.states)} states "
                             f"for {self.record.n} particles")

    def particle_map(self, i: int) -> np.ndarray:
        """The true map of particle ``i``: exact for blob kinds, its state's map for discrete kinds."""
        from bench.suite.kinds import ALL_BLOB_KINDS

        if self.record.discrete or self.record.kind not in ALL_BLOB_KINDS:
            return self.state_maps[self.states[i]]
        return ALL_BLOB_KINDS[self.record.kind].volume(self.coords[i], self.record.box)
