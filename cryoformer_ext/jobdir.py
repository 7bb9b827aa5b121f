"""The layout of a job folder, in one place, and what ``eval`` and ``select`` read from a finished job.

A job folder is what ``cryoformer train``, ``cryoformer-relion`` (``External/jobNNN/``) or
``cryoformer-cryosparc`` leave behind: ``latents.npy`` and ``checkpoints/`` next to ``analysis/``. The
offline cryoSPARC mode keeps that engine folder in ``<out>/cryoformer/``; giving ``<out>`` also works.

Numbering, the same everywhere: particles are 0-based in input order (rows of ``latents.npy``);
k-means classes are 1-based as in ``kmeans/class_001.mrc`` and RELION's ``rlnClassNumber``
(``kmeans_labels.txt`` stores them 0-based); principal components are 1-based (``pc1/``).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict

# every entry point writes and reads a job folder through these names
CHECKPOINT_DIR = "checkpoints"          # the trained model (a job resumes from the last one)
LATENTS_FILE = "latents.npy"            # (N, zdim) posterior means, input order
CONFIG_FILE = "job_config.json"         # the JobConfig the job ran with
LOSS_FILE = "loss_history.json"         # mean loss per epoch
ANALYSIS_SUBDIR = "analysis"            # maps, plots, summary.json (cryoformer_ext.analysis)
PARTICLES_FILE = "particles.star"       # the input particles with latents and k-means classes (RELION jobs)
PREDICTED_POSES_FILE = "predicted_poses.npz"  # orientations the encoder predicted or refined
OFFLINE_ENGINE_SUBDIR = "cryoformer"    # the engine folder inside a cryoSPARC offline output folder
OFFLINE_PARTICLES_STEM = "cryoformer_particles"  # the offline mode's particles .cs/.csg


class JobFilesError(ValueError):
    """A job folder lacks what a command needs; the message names the file."""


class JobFiles(BaseModel):
    """The per-particle results of a finished heterogeneous job."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    root: Path                 # the folder the user gave
    job_dir: Path              # the engine folder (latents.npy, checkpoints/)
    analysis_dir: Path
    latents: np.ndarray        # (N, zdim) float32, input order
    labels: np.ndarray | None = None           # (N,) k-means class, 0-based
    center_particles: list[int] | None = None  # particle whose latent made class c's map (0-based c)
    pca_coords: np.ndarray | None = None       # (N, n_components)

    @property
    def n_particles(self) -> int:
        return int(self.latents.shape[0])

    @property
    def n_classes(self) -> int:
        return 0 if self.center_particles is None else len(self.center_particles)

    def require_classes(self) -> np.ndarray:
        if self.labels is None or self.center_particles is None:
            raise JobFilesError(f"{self.analysis_dir}: no k-means classes (kmeans_labels.txt / summary.json); "
                                "run 'cryoformer analyze' on the job first")
        return self.labels

    def require_pca(self) -> np.ndarray:
        if self.pca_coords is None:
            raise JobFilesError(f"{self.analysis_dir}: no pca_coords.npy; run 'cryoformer analyze' on the job first")
        return self.pca_coords

    def check_particle(self, i: int) -> int:
        if not 0 <= i < self.n_particles:
            raise JobFilesError(f"particle {i} is out of range: the job has {self.n_particles} particles "
                                f"(0-based, 0..{self.n_particles - 1})")
        return int(i)

    def check_class(self, c: int) -> int:
        """A 1-based class number, checked against the classes the analysis made."""
        self.require_classes()
        if not 1 <= c <= self.n_classes:
            raise JobFilesError(f"class {c} does not exist: the analysis has classes 1..{self.n_classes} "
                                "(1-based, as in kmeans/class_001.mrc and rlnClassNumber)")
        return int(c)

    def class_particle(self, c: int) -> int:
        """The particle whose latent made ``kmeans/class_{c:03d}.mrc`` (``c`` 1-based)."""
        return int(self.center_particles[self.check_class(c) - 1])

    def endpoint(self, spec: str) -> int:
        """A path end point -> particle index: ``12`` or ``p12`` (particle, 0-based), ``c3`` (class, 1-based:
        the particle nearest its centre, whose latent made its map)."""
        m = re.fullmatch(r"\s*([pPcC]?)(\d+)\s*", str(spec))
        if not m:
            raise JobFilesError(f"end point {spec!r}: expected a particle (12 or p12, 0-based) or a k-means "
                                "class (c3, 1-based)")
        kind, num = m.group(1).lower(), int(m.group(2))
        return self.class_particle(num) if kind == "c" else self.check_particle(num)


def engine_dir(root: str | os.PathLike) -> Path:
    """The folder holding ``latents.npy`` / ``checkpoints/``: ``root`` itself or ``root/cryoformer``."""
    root = Path(root)
    if not root.is_dir():
        raise JobFilesError(f"{root}: not a folder")
    for cand in (root, root / OFFLINE_ENGINE_SUBDIR):
        if (cand / "latents.npy").exists() or (cand / "checkpoints").is_dir():
            return cand
    raise JobFilesError(f"{root}: not a cryoFormer job folder (no latents.npy or checkpoints/ in it, nor in "
                        f"{root / OFFLINE_ENGINE_SUBDIR})")


def parse_int_list(text: str, what: str) -> list[int]:
    """``'1,3'`` / ``'1 3'`` / ``'2-4'`` -> ``[1, 3]`` / ``[1, 3]`` / ``[2, 3, 4]``."""
    out: list[int] = []
    for part in re.split(r"[,\s]+", str(text).strip()):
        if not part:
            continue
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise JobFilesError(f"{what} {text!r}: expected numbers such as 1,3 or 2-4")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise JobFilesError(f"{what} {text!r}: range {part} runs backwards")
        out.extend(range(lo, hi + 1))
    if not out:
        raise JobFilesError(f"{what}: no numbers given")
    return list(dict.fromkeys(out))


def _load_labels(adir: Path, n: int) -> np.ndarray | None:
    path = adir / "kmeans_labels.txt"
    if not path.exists():
        return None
    labels = np.loadtxt(path, dtype=np.int64, comments="#", ndmin=1)
    if labels.shape != (n,):
        raise JobFilesError(f"{path}: {labels.shape[0]} labels for {n} particles in latents.npy; "
                            "rerun 'cryoformer analyze'")
    return labels


def _load_centers(adir: Path) -> list[int] | None:
    path = adir / "summary.json"
    if not path.exists():
        return None
    try:
        km = json.loads(path.read_text()).get("kmeans") or {}
    except (json.JSONDecodeError, AttributeError) as err:
        raise JobFilesError(f"{path}: not a valid analysis summary ({err})") from None
    parts = km.get("center_particles")
    return None if parts is None else [int(i) for i in parts]


def load_job_files(root: str | os.PathLike, analysis: str | os.PathLike | None = None) -> JobFiles:
    """Read latents (required) and, when present, the analysis' k-means classes and PCA coordinates.

    ``analysis`` is the analysis folder (default ``<job>/analysis``, e.g. another one written by
    ``cryoformer analyze --out``).
    """
    root = Path(root)
    jdir = engine_dir(root)
    lat_file = jdir / "latents.npy"
    if not lat_file.exists():
        raise JobFilesError(f"{jdir}: no latents.npy; the job has not finished (run it again to resume)")
    latents = np.load(lat_file)
    if latents.ndim != 2 or latents.shape[1] == 0:
        raise JobFilesError(f"{lat_file}: shape {latents.shape}; a homogeneous job (zdim 0) has no latent space "
                            "to select from or travel through")
    n = int(latents.shape[0])
    adir = Path(analysis) if analysis is not None else jdir / ANALYSIS_SUBDIR
    labels = _load_labels(adir, n)
    centers = _load_centers(adir)
    if labels is not None and centers is not None and labels.max(initial=-1) >= len(centers):
        raise JobFilesError(f"{adir}: kmeans_labels.txt has class {labels.max() + 1} but summary.json lists "
                            f"{len(centers)} classes")
    pca = None
    if (adir / "pca_coords.npy").exists():
        pca = np.load(adir / "pca_coords.npy")
        if pca.ndim != 2 or pca.shape[0] != n:
            raise JobFilesError(f"{adir / 'pca_coords.npy'}: shape {pca.shape} does not match {n} particles")
    return JobFiles(root=root, job_dir=jdir, analysis_dir=adir, latents=latents.astype(np.float32),
                    labels=labels, center_particles=centers, pca_coords=pca)


INPUT_SCALE_FILE = "input_particles.json"


class InputScale(BaseModel):
    """Box and pixel size of the particles a job was trained on: the default scale of every map it writes
    later (``analyze``, ``eval``), so that a map made a week after training still matches the particles."""

    model_config = ConfigDict(extra="forbid")

    box: int
    pixel_size_A: float


def write_input_scale(job_dir: str | os.PathLike, scale: InputScale) -> Path:
    from cryoformer_ext.formats.atomic import atomic_write_text

    return atomic_write_text(Path(job_dir) / INPUT_SCALE_FILE, scale.model_dump_json(indent=2) + "\n")


def read_input_scale(job_dir: str | os.PathLike) -> InputScale | None:
    """The job's :class:`InputScale`; None for a job written before it was recorded."""
    path = Path(job_dir) / INPUT_SCALE_FILE
    if not path.exists():
        return None
    try:
        return InputScale.model_validate_json(path.read_text())
    except ValueError as err:
        raise JobFilesError(f"{path}: not a valid record of the input particles ({err})") from None
