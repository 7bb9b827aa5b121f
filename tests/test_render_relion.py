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
from cryoformer.simulate import analytic_projection, true_volume
from cryoformer_ext.outputs import write_mrc
from cryoformer_ext.star_io import write_simulated_star

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


@pytest.mark.relion
def test_model_render_path_matches_relion_project(relion_case):
    """The neural renderer's own path (sphere lattice, rotation, scatter along z, shift, CTF) with the
    field replaced by trilinear sampling of the known map reproduces relion_project."""
    vol, rot, shift, ctf, images = relion_case
    model = CryoFormer(ModelConfig(box=BOX, pixel_size_A=APIX, zdim=0, tokens=4, channels=8, heads=1,
                                   enc_layers=1, enc_dim=8))
    v = torch.as_tensor(vol).view(1, 1, BOX, BOX, BOX)

    def density(world, kv, return_attention=False):
        grid = (world + BOX // 2) / (BOX - 1) * 2 - 1
        s = torch.nn.functional.grid_sample(v.expand(world.shape[0], -1, -1, -1, -1), grid.view(world.shape[0], 1, 1, -1, 3),
                                            align_corners=True)
        return s.view(world.shape[0], -1)

    model.density = density
    tokens = torch.zeros(N, 4, 8)
    proj = model.render(tokens, torch.as_tensor(rot, dtype=torch.float32))
    ours = corrupt(proj, APIX, torch.as_tensor(shift, dtype=torch.float32), torch.as_tensor(ctf.take(np.arange(N)))).numpy()
    corrs = [_corr(ours[i], images[i]) for i in range(N)]
    assert min(corrs) >= 0.99, corrs


def test_analytic_projection_matches_voxel_projection():
    """Exact Gaussian line integrals (the simulator) against the voxel projector, no RELION needed."""
    rng = np.random.default_rng(3)
    rot = random_rotations(4, rng)
    vol = torch.as_tensor(true_volume(0.7, BOX))
    ours = project_volume(vol, torch.as_tensor(rot, dtype=torch.float32)).numpy()
    for i in range(4):
        assert _corr(ours[i], analytic_projection(0.7, rot[i], BOX)) > 0.998
