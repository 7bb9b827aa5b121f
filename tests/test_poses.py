"""The engine's pose convention against independent oracles: SciPy and cryoDRGN's recorded parses."""

import pickle

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from cryoformer import poses


def test_relion_euler_matches_scipy_definition():
    rng = np.random.default_rng(0)
    e = rng.uniform([-180, 0, -180], [180, 180, 180], (200, 3))
    ours = poses.relion_euler_to_rot(*e.T)
    # RELION's Euler_angles2matrix is the transpose of the intrinsic ZYZ rotation (notes §3.3)
    ref = Rotation.from_euler("ZYZ", e, degrees=True).as_matrix().transpose(0, 2, 1)
    np.testing.assert_allclose(ours, ref, atol=1e-12)


def test_euler_round_trip_including_gimbal_lock():
    rng = np.random.default_rng(1)
    e = rng.uniform([-180, 0, -180], [180, 180, 180], (100, 3))
    e[:5, 1] = 0.0
    e[5:10, 1] = 180.0
    m = poses.relion_euler_to_rot(*e.T)
    back = poses.relion_euler_to_rot(*poses.rot_to_relion_euler(m))
    np.testing.assert_allclose(back, m, atol=1e-9)


def test_rotvec_round_trip_near_pi():
    rng = np.random.default_rng(2)
    r = poses.random_rotations(500, rng)
    axis = rng.normal(size=(20, 3))
    axis /= np.linalg.norm(axis, axis=1, keepdims=True)
    near_pi = Rotation.from_rotvec(axis * (np.pi - 1e-7)).as_matrix()
    for m in (r, near_pi):
        np.testing.assert_allclose(poses.rotvec_to_matrix(poses.matrix_to_rotvec(m)), m, atol=1e-9)
    np.testing.assert_allclose(poses.rotvec_to_matrix(axis), Rotation.from_rotvec(axis).as_matrix(), atol=1e-12)


def test_relion_star_poses_equal_cryodrgn_parse(shared_data):
    import starfile

    df = starfile.read(shared_data / "cryodrgn" / "FinalRefinement-OriginalParticles-PfCRT.star")
    rot, trans = pickle.load(open(shared_data / "cryodrgn" / "pose.star.pkl", "rb"))
    ours = poses.relion_euler_to_rot(df["rlnAngleRot"], df["rlnAngleTilt"], df["rlnAnglePsi"])
    np.testing.assert_allclose(ours, rot, atol=1e-6)
    # cryoDRGN's trans is the origin as a fraction of the box (D = 300 for this parse)
    np.testing.assert_allclose(df[["rlnOriginX", "rlnOriginY"]].to_numpy() / 300, trans, atol=1e-9)


def test_cryosparc_poses_equal_cryodrgn_parse(shared_data):
    data = np.load(shared_data / "cryosparc" / "cryosparc_P12_J24_001_particles.cs")
    rot, trans = pickle.load(open(shared_data / "cryodrgn" / "pose.cs.pkl", "rb"))
    ours = poses.cryosparc_pose_to_rot(data["alignments3D/pose"])
    np.testing.assert_allclose(ours, rot, atol=2e-6)
    np.testing.assert_allclose(data["alignments3D/shift"] / 180, trans, atol=1e-7)
    back = poses.rot_to_cryosparc_pose(ours)
    np.testing.assert_allclose(poses.cryosparc_pose_to_rot(back), ours, atol=1e-6)


def test_six_d_representation_gives_rotations():
    import torch

    v = torch.randn(64, 6, dtype=torch.float64)
    r = poses.six_d_to_rot(v).numpy()
    np.testing.assert_allclose(r @ r.transpose(0, 2, 1), np.broadcast_to(np.eye(3), r.shape), atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(r), 1.0, atol=1e-12)
    # the first row is the normalised first 3-vector (Gram-Schmidt order)
    np.testing.assert_allclose(r[:, 0], (v[:, :3] / v[:, :3].norm(dim=1, keepdim=True)).numpy(), atol=1e-12)
