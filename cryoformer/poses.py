"""The engine's one pose convention, and conversions into it.

Every rotation and shift inside the engine follows this single convention. Adapters convert at the
border (RELION Euler angles and origins, cryoSPARC axis-angle vectors and pixel shifts) by calling
the functions here, so no other module ever needs to know where a pose came from.

Coordinates
    A volume ``V`` is stored as an array ``V[z, y, x]`` (MRC order, x fastest) whose centre voxel is
    index ``D // 2`` on every axis. An image ``I[y, x]`` has its centre at pixel ``D // 2``.
    A point is the row vector ``r = (x, y, z)`` in pixels relative to that centre.

Rotation ``rot`` (3x3, per particle)
    ``rot`` is RELION's ``Euler_angles2matrix(rot, tilt, psi)`` matrix ``A``, which is also the
    matrix cryoDRGN stores in its ``pose.pkl`` files. An image-frame point ``r`` (row vector) sits at
    the volume-frame point ``r @ rot`` (column form: ``A^T r``). The noise-free, uncorrupted image is
    the line integral along the image z axis::

        P(x, y) = sum_z V((x, y, z) @ rot)

Shift ``shift_px`` (2, per particle)
    RELION's origin ``(rlnOriginX, rlnOriginY)`` in pixels of the stored image (3.1+:
    ``rlnOriginXAngst / pixel size``), which is cryoSPARC's ``alignments3D/shift`` (no sign change).
    The recorded image is the centred projection translated by ``-shift_px``; translating the recorded
    image by ``+shift_px`` centres the particle. In Fourier space (numpy's forward FFT sign,
    frequencies in cycles per pixel): ``F_image(k) = F_projection(k) * exp(+2 pi i k . shift_px)``.

cryoDRGN stores ``trans = shift_px / D`` (a fraction of the box); the conversion is a division.
"""

from __future__ import annotations


import numpy as np
import torch


def relion_euler_to_rot(rot_deg: np.ndarray, tilt_deg: np.ndarray, psi_deg: np.ndarray) -> np.ndarray:
    """RELION ``(rlnAngleRot, rlnAngleTilt, rlnAnglePsi)`` in degrees to ``rot`` matrices (N, 3, 3).

    Written out from RELION's ``Euler_angles2matrix`` (A = Rz(psi) Ry(tilt) Rz(rot) with RELION's
    passive elementary rotations) so that the engine needs no SciPy.
    """
    a = np.deg2rad(np.asarray(rot_deg, dtype=np.float64))
    b = np.deg2rad(np.asarray(tilt_deg, dtype=np.float64))
    g = np.deg2rad(np.asarray(psi_deg, dtype=np.float64))
    ca, sa, cb, sb, cg, sg = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(g), np.sin(g)
    m = np.empty(a.shape + (3, 3), dtype=np.float64)
    m[..., 0, 0] = cg * cb * ca - sg * sa
    m[..., 0, 1] = cg * cb * sa + sg * ca
    m[..., 0, 2] = -cg * sb
    m[..., 1, 0] = -sg * cb * ca - cg * sa
    m[..., 1, 1] = -sg * cb * sa + cg * ca
    m[..., 1, 2] = sg * sb
    m[..., 2, 0] = sb * ca
    m[..., 2, 1] = sb * sa
    m[..., 2, 2] = cb
    return m


def rot_to_relion_euler(rot: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of :func:`relion_euler_to_rot`: (rot, tilt, psi) in degrees, tilt in [0, 180].

    Follows RELION's ``Euler_matrix2angles`` choice of branch, including the gimbal-lock case
    (tilt = 0 or 180, where only rot + psi or rot - psi is defined and psi is set to 0).
    """
    m = np.asarray(rot, dtype=np.float64)
    tilt = np.arccos(np.clip(m[..., 2, 2], -1.0, 1.0))
    sb = np.sin(tilt)
    regular = np.abs(sb) > 1e-6
    rot_a = np.where(regular, np.arctan2(m[..., 2, 1], m[..., 2, 0]), 0.0)
    psi = np.where(regular, np.arctan2(m[..., 1, 2], -m[..., 0, 2]), 0.0)
    # gimbal lock (tilt 0 or 180): only rot +/- psi is defined; put it all into rot, psi = 0.
    # tilt 0: A = Rz(rot) -> rot = atan2(A01, A00); tilt 180: A = Ry(180) Rz(rot) -> atan2(-A01, -A00)
    sign = np.where(m[..., 2, 2] > 0, 1.0, -1.0)
    gl_rot = np.arctan2(sign * m[..., 0, 1], sign * m[..., 0, 0])
    rot_a = np.where(regular, rot_a, gl_rot)
    return np.rad2deg(rot_a), np.rad2deg(tilt), np.rad2deg(psi)


def rotvec_to_matrix(v: np.ndarray) -> np.ndarray:
    """Rodrigues' formula: axis-angle vectors (N, 3), radians, to active rotation matrices (N, 3, 3)."""
    v = np.asarray(v, dtype=np.float64)
    theta = np.linalg.norm(v, axis=-1, keepdims=True)
    safe = np.where(theta > 1e-12, theta, 1.0)
    k = v / safe
    kx, ky, kz = k[..., 0], k[..., 1], k[..., 2]
    zero = np.zeros_like(kx)
    kmat = np.stack([zero, -kz, ky, kz, zero, -kx, -ky, kx, zero], axis=-1).reshape(v.shape[:-1] + (3, 3))
    t = theta[..., None]
    eye = np.broadcast_to(np.eye(3), kmat.shape)
    out = eye + np.sin(t) * kmat + (1.0 - np.cos(t)) * (kmat @ kmat)
    return np.where(theta[..., None] > 1e-12, out, eye)


def matrix_to_rotvec(m: np.ndarray) -> np.ndarray:
    """Active rotation matrices (N, 3, 3) to axis-angle vectors with angle in [0, pi].

    Goes through a unit quaternion chosen by Shepperd's largest-component rule, which stays accurate
    near 180 degrees where the skew-symmetric part of the matrix vanishes.
    """
    m = np.asarray(m, dtype=np.float64)
    flat = m.reshape(-1, 3, 3)
    tr = np.trace(flat, axis1=1, axis2=2)
    cand = np.stack([tr, flat[:, 0, 0], flat[:, 1, 1], flat[:, 2, 2]], axis=1)
    pick = np.argmax(cand, axis=1)
    q = np.empty((len(flat), 4))  # (w, x, y, z)
    for i, k in enumerate(pick):
        a = flat[i]
        if k == 0:
            s = 2.0 * np.sqrt(max(1.0 + tr[i], 1e-300))
            q[i] = [0.25 * s, (a[2, 1] - a[1, 2]) / s, (a[0, 2] - a[2, 0]) / s, (a[1, 0] - a[0, 1]) / s]
        else:
            j, l = [(1, 2), (2, 0), (0, 1)][k - 1]
            d = k - 1
            s = 2.0 * np.sqrt(max(1.0 + a[d, d] - a[j, j] - a[l, l], 1e-300))
            v = np.empty(3)
            v[d] = 0.25 * s
            v[j] = (a[j, d] + a[d, j]) / s
            v[l] = (a[l, d] + a[d, l]) / s
            q[i] = [(a[l, j] - a[j, l]) / s, *v]
    q[q[:, 0] < 0] *= -1.0
    vnorm = np.linalg.norm(q[:, 1:], axis=1)
    theta = 2.0 * np.arctan2(vnorm, q[:, 0])
    scale = np.where(vnorm > 1e-12, theta / np.where(vnorm > 1e-12, vnorm, 1.0), 2.0)
    return (q[:, 1:] * scale[:, None]).reshape(m.shape[:-2] + (3,))


def cryosparc_pose_to_rot(pose: np.ndarray) -> np.ndarray:
    """cryoSPARC ``alignments3D/pose`` (axis-angle, radians; rotates particle frame into volume frame).

    cryoSPARC's matrix ``R(pose)`` maps image-frame column vectors to the volume frame, so the
    engine's row-vector matrix is its transpose (equal to RELION's ``A``).
    """
    return np.swapaxes(rotvec_to_matrix(pose), -1, -2)


def rot_to_cryosparc_pose(rot: np.ndarray) -> np.ndarray:
    return matrix_to_rotvec(np.swapaxes(np.asarray(rot, dtype=np.float64), -1, -2))


def six_d_to_rot(v: torch.Tensor) -> torch.Tensor:
    """6-D (S2 x S2) representation to ``rot`` matrices by Gram-Schmidt (rows e1, e2, e3).

    Continuous on SO(3), which is why the orientation encoder regresses it instead of Euler angles.
    """
    a1, a2 = v[..., :3], v[..., 3:6]
    e1 = torch.nn.functional.normalize(a1, dim=-1)
    u2 = a2 - (e1 * a2).sum(-1, keepdim=True) * e1
    e2 = torch.nn.functional.normalize(u2, dim=-1)
    e3 = torch.cross(e1, e2, dim=-1)
    return torch.stack([e1, e2, e3], dim=-2)


def split_inplane(rot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``rot`` = Rz(psi) @ rot0 into the in-plane angle psi (B,) and the view rotation rot0.

    ``rot0`` only depends on the viewing direction (RELION rot and tilt). Where the view is along the
    z axis (tilt 0 or 180) psi is not defined and is set to 0.
    """
    s13, s23 = -rot[..., 0, 2], rot[..., 1, 2]
    regular = (s13 * s13 + s23 * s23) > 1e-12
    psi = torch.where(regular, torch.atan2(s23, s13), torch.zeros_like(s13))
    c, s = torch.cos(psi), torch.sin(psi)
    zero, one = torch.zeros_like(c), torch.ones_like(c)
    rz_inv = torch.stack([c, -s, zero, s, c, zero, zero, zero, one], -1).view(*psi.shape, 3, 3)
    return psi, rz_inv @ rot


def rotation_angle_deg(r1: np.ndarray, r2: np.ndarray) -> np.ndarray:
    """Geodesic angle between two sets of rotation matrices, in degrees (for pose checks)."""
    rel = np.swapaxes(np.asarray(r1), -1, -2) @ np.asarray(r2)
    c = np.clip((np.trace(rel, axis1=-2, axis2=-1) - 1.0) / 2.0, -1.0, 1.0)
    return np.rad2deg(np.arccos(c))


def random_rotations(n: int, rng: np.random.Generator) -> np.ndarray:
    """Uniformly distributed rotations (N, 3, 3) from uniform unit quaternions."""
    q = rng.normal(size=(n, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T
    m = np.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
        2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
        2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y),
    ], axis=1).reshape(n, 3, 3)
    return m


__all__ = [
    "relion_euler_to_rot", "rot_to_relion_euler", "rotvec_to_matrix", "matrix_to_rotvec",
    "cryosparc_pose_to_rot", "rot_to_cryosparc_pose", "six_d_to_rot", "rotation_angle_deg",
    "random_rotations",
]
