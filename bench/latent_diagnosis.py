"""What a cryoFormer latent holds, epoch by epoch: the spread of the encoder's means, how far the maps move
along their first principal component, and how much of the spread the pose, the defocus or the true
conformation explain.

Why: a latent that does not follow the motion yet can be collapsed (every image the same z), or spread but
driven by something else (the view, the defocus, the noise). The remedies differ, so the bench tells them
apart before a setting is changed. Reads the per-epoch checkpoints that ``bench_vs_cryodrgn.py --suite ...
--methods cryoformer --keep-work`` leaves under ``--work``:

    python bench/latent_diagnosis.py --work W/a_hinge_snr0.1/D32 --data SUITE/a_hinge_snr0.1 --out result.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.suite.dataset import LoadedTruth  # noqa: E402
from bench.suite.scoring import latent_spearman  # noqa: E402


def explained(x: np.ndarray, zc: np.ndarray, seed: int = 0) -> float:
    """Cross-validated R^2 of a 10-neighbour regression of the centred latents ``zc`` from ``x``."""
    from sklearn.model_selection import KFold, cross_val_predict
    from sklearn.neighbors import KNeighborsRegressor

    pred = cross_val_predict(KNeighborsRegressor(10), x, zc, cv=KFold(5, shuffle=True, random_state=seed))
    return float(1 - ((zc - pred) ** 2).sum() / (zc ** 2).sum())


def map_motion_along_pc1(rec, z: np.ndarray, pc1_dir: np.ndarray, pc1: np.ndarray) -> float:
    """Voxel s.d. across 7 maps along PC1 (5-95 % of the particles), over the s.d. of their mean map."""
    qs = np.quantile(pc1, np.linspace(0.05, 0.95, 7))
    zs = (z.mean(0) + qs[:, None] * pc1_dir[None]).astype(np.float32)
    vols = rec.volumes(zs, rec.model.cfg.box)
    return float(vols.std(0).mean() / vols.mean(0).std())


def diagnose(ckpt: Path, data, truth: LoadedTruth) -> dict:
    from cryoformer.infer import Reconstruction

    rec = Reconstruction.load(ckpt)
    z = rec.encode(data)
    zc = z - z.mean(0)
    _, s, vt = np.linalg.svd(zc, full_matrices=False)
    pc1 = zc @ vt[0]
    rot = data.rot.reshape(len(data), 9)
    defocus = data.ctf.take(np.arange(len(data)))[:, :1] / 1e4
    return {"checkpoint": ckpt.name, "mu_total_sd": float(np.sqrt((zc ** 2).sum(1).mean())),
            "variance_fraction_pc1_3": [float(x) for x in (s ** 2 / (s ** 2).sum())[:3]],
            "spearman_pc1": latent_spearman(z, truth.coords),
            "map_motion_along_pc1": map_motion_along_pc1(rec, z, vt[0], pc1),
            "r2_from_pose": explained(rot, zc), "r2_from_defocus": explained(defocus, zc),
            "r2_from_pose_and_defocus": explained(np.c_[rot, defocus], zc),
            "r2_from_true_coordinates": explained(truth.coords, zc)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True, help="a kept cryoFormer run (holds epoch_*.pt)")
    p.add_argument("--data", type=Path, required=True, help="the suite dataset it was trained on")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from cryoformer_ext.formats.star import read_particles_star

    truth = LoadedTruth(a.data)
    data = read_particles_star(a.data / "particles.star", a.data).data
    rows = []
    for ck in sorted(a.work.rglob("epoch_*.pt")):
        rows.append(diagnose(ck, data, truth))
        print(json.dumps(rows[-1]), flush=True)
    a.out.write_text(json.dumps({"work": a.work.name, "data": a.data.name, "epochs": rows}, indent=1))


if __name__ == "__main__":
    main()
