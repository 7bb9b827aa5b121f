"""The renderer against RELION's own projector: same map, poses, shifts and astigmatic CTFs."""

import subprocess

import mrcfile
import numpy as np
import pytest
import torch

from cryoformer.data import CTFParams
from cryoformer.model import CryoFormer, ModelConfig
from cryoformer.poses import random_rotations
from cryoformer.render import corrupt, project_volume
from cryoformer.simulate import analytic_projection, blob_model, true_volume
from cryoformer_ext.formats.atomic import write_mrc
from cryoformer_ext.formats.star import write_simulated_star

BOX, APIX, N = 32, 3.0, 8


@pytest.fixture(scope="module")
def relion_case(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("relion_project")
    rng = np.random.default_rng(7)
    vol = true_volume(0.3, BOX)
    write_mrc(tmp / "map.mrc", vol, APIX)
    rot = random_rotations(N, rng)
    shift = rng.uniform(-3, 3, (N, 2))
    du = rng.uniform(8000, 25000, N)
    ctf = CTFParams.constant(N, defocus_u_A=du, defocus_v_A=du - rng.uniform(500, 4000, N),
                             defocus_angle_deg=rng.uniform(0, 180, N), phase_shift_deg=rng.uniform(0, 40, N),
                             bfactor=rng.uniform(0, 80, N), amp_contrast=0.07)
    write_simulated_star(tmp / "in.star", rot=rot, shift_px=shift, ctf=ctf, pixel_size_A=APIX, box=BOX,
                         stack_path="unused.mrcs")
    run = subprocess.run(["relion_project", "--i", "map.mrc", "--ang", "in.star", "--ctf", "--o", "proj"],
                         cwd=tmp, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    images = mrcfile.read(tmp / "proj.mrcs")
    return vol, rot, shift, ctf, images


def _corr(a, b):
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


@pytest.mark.relion
def test_voxel_projection_matches_relion_project(relion_case):
    vol, rot, shift, ctf, images = relion_case
    ours = corrupt(project_volume(torch.as_tensor(vol), torch.as_tensor(rot, dtype=torch.float32)), APIX,
                   torch.as_tensor(shift, dtype=torch.float32), torch.as_tensor(ctf.take(np.arange(N)))).numpy()
    corrs = [_corr(ours[i], images[i]) for i in range(N)]
    assert min(corrs) >= 0.99, corrs
    # amplitudes agree too (RELION projects in Fourier space, we in real space: a few % differ)
    ratio = ours.std(axis=(1, 2)) / images.std(axis=(1, 2))
    assert np.all(np.abs(ratio - 1) < 0.1), ratio
    # and a wrong convention would not pass: transposed rotations or flipped shifts decorrelate
    wrong = corrupt(project_volume(torch.as_tensor(vol), torch.as_tensor(rot.transpose(0, 2, 1), dtype=torch.float32)),
                    APIX, torch.as_tensor(-shift, dtype=torch.float32), torch.as_tensor(ctf.take(np.arange(N)))).numpy()
    assert np.mean([_corr(wrong[i], images[i]) for i in range(N)]) < 0.9


def _analytic_field(t: float):
    """The simulator's continuous map of conformation ``t`` as the model's field: density at any points."""
    cen, amp, sig = blob_model(t, BOX)
    cen_t = torch.as_tensor(cen, dtype=torch.float32)

    def density(pts, kv, return_attention=False, plan=None):
        d2 = ((pts.unsqueeze(-2) - cen_t) ** 2).sum(-1)                       # (..., P, K)
        dens = (torch.as_tensor(amp, dtype=torch.float32) * torch.exp(-d2 / (2 * sig * sig))).sum(-1)
        return dens.expand(kv[0].shape[0], -1) if dens.dim() == 1 else dens
    return density


@pytest.mark.relion
@pytest.mark.parametrize("render", ["canonical", "rotated"])
@pytest.mark.parametrize("occupancy", [False, True])
def test_model_render_paths_match_relion_project(relion_case, render, occupancy):
    """The neural renderer's own paths (lattices, rotation, occupancy skipping, projection, shift, CTF) with
    the field replaced by the simulator's continuous map reproduce relion_project of that map.

    ``canonical`` samples the field at the voxel grid and projects each image's map trilinearly;
    ``rotated`` samples it at each image's rotated lattice (the paper). Both are compared with the exact
    line integrals too, which is what the canonical form costs in accuracy."""
    vol, rot, shift, ctf, images = relion_case
    model = CryoFormer(ModelConfig(box=BOX, pixel_size_A=APIX, zdim=0, tokens=4, channels=8, heads=1,
                                   enc_layers=1, enc_dim=8, render=render, occupancy_cells=BOX // 4 if occupancy else 0))
    if occupancy:
        frac = model.occupancy.set_from_volumes([vol], threshold=0.05, margin=1)
        assert frac < 0.6  # most of the sphere is skipped
    model.density = _analytic_field(0.3)
    rot_t = torch.as_tensor(rot, dtype=torch.float32)
    proj = model.render(torch.zeros(N, 4, 8), rot_t)
    ours = corrupt(proj, APIX, torch.as_tensor(shift, dtype=torch.float32), torch.as_tensor(ctf.take(np.arange(N)))).numpy()
    corrs = [_corr(ours[i], images[i]) for i in range(N)]
    assert min(corrs) >= 0.99, corrs
    exact = [_corr(proj[i].detach().numpy(), analytic_projection(0.3, rot[i], BOX)) for i in range(N)]
    assert min(exact) >= 0.998, exact
    ratio = proj.detach().numpy().sum(axis=(1, 2)) / np.array([analytic_projection(0.3, r, BOX).sum() for r in rot])
    assert np.all(np.abs(ratio - 1) < 0.02), ratio


def test_analytic_projection_matches_voxel_projection():
    """Exact Gaussian line integrals (the simulator) against the voxel projector, no RELION needed."""
    rng = np.random.default_rng(3)
    rot = random_rotations(4, rng)
    vol = torch.as_tensor(true_volume(0.7, BOX))
    ours = project_volume(vol, torch.as_tensor(rot, dtype=torch.float32)).numpy()
    for i in range(4):
        assert _corr(ours[i], analytic_projection(0.7, rot[i], BOX)) > 0.998
