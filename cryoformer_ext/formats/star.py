"""RELION particle STAR files: read into engine data, write back with every original column.

Formats
    * RELION 3.0: one loop block (``data_``, ``data_images`` ...); optics per particle; pixel size from
      ``rlnImagePixelSize`` or ``1e4 * rlnDetectorPixelSize / rlnMagnification``; origins
      ``rlnOriginX/Y`` in pixels. No ``# version`` line (RELION 3.1 refuses to convert a one-block file
      that carries ``# version 30001``), so a 3.0 file is written back as 3.0.
    * RELION 3.1 / 4.0 (``# version 30001``) and 5.0 (``# version 50001``): ``data_optics`` +
      ``data_particles`` in any order; origins ``rlnOriginXAngst/YAngst`` in Å. Written back with the
      input's own version line.

Image names ``000012@Extract/job007/stack.mrcs`` are 1-based and relative to the RELION project
directory (the working directory of a RELION job), not to the STAR file's folder.

CTF values are taken per particle first, then from the particle's optics group, then RELION's defaults
(``CTF::readValue``): amplitude contrast 0, B-factor 0, scale 1, phase shift 0, DefocusV = DefocusU,
defocus angle 0. Voltage and Cs have no default (RELION's observation model requires them).

RELION 5 tomography particles (``rlnTomoName``/``rlnTomoParticleName``, ``rlnImageDimensionality`` 3, or a
``data_general`` block with ``rlnTomoSubTomosAre2DStacks``) are refused with one message saying so.

Particles without CTF columns are refused unless the caller allows it (job parameter ``ctf = no``: images
without a CTF, e.g. simulated): the same rule as for cryoSPARC particles.

Every problem raises :class:`StarFileError` whose message starts with the STAR file's path and names
the particle (1-based row and file line), column or optics group where that is possible.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Mapping

import numpy as np
import pandas as pd
import starfile
from pydantic import BaseModel

from cryoformer.data import CTFParams, ParticleData
from cryoformer.poses import relion_euler_to_rot, rot_to_relion_euler
from cryoformer_ext.config import NO_CTF_HINT
from cryoformer_ext.formats.mrc_stack import ImageStackError, MrcStackSource
from cryoformer_ext.formats.atomic import atomic_write_text

LATENT_PREFIX = "rlnCryoformerZ"
CLASS_LABEL = "rlnClassNumber"
PIXEL_TOL = 1e-4  # relative tolerance when comparing pixel sizes of optics groups


class StarFileError(ValueError):
    """A STAR file cannot be used; the message names the file and, where possible, row/column."""


class OpticsGroupInfo(BaseModel):
    number: int
    name: str
    pixel_size_A: float
    box: int | None
    voltage_kv: float | None
    cs_mm: float | None
    amp_contrast: float | None
    n_particles: int


class StarRecord(BaseModel):
    """What was read, in plain values (for logs, summaries and the writer)."""

    path: str
    root: str
    relion_format: Literal["3.0", "3.1"]
    version: int | None  # the ``# version NNNNN`` line (30001 for 3.1/4.0, 50001 for 5.0), None if absent
    particles_block: str
    n_particles: int
    box: int | None
    pixel_size_A: float
    optics_groups: list[OpticsGroupInfo]
    has_poses: bool
    has_ctf: bool
    stack_files: list[str]
    images_checked: bool
    warnings: list[str] = []


@dataclass
class ParticleStar:
    """A read particle STAR file: the record, the engine's data, and the original tables."""

    record: StarRecord
    data: ParticleData
    optics: pd.DataFrame | None  # None for a RELION 3.0 file
    particles: pd.DataFrame

    def write(self, path: str | os.PathLike, *, latents: np.ndarray | None = None,
              labels: np.ndarray | None = None, extra: Mapping[str, np.ndarray] | None = None) -> Path:
        """Write the original tables (plus latent/class columns) in the input's own format."""
        df = add_result_columns(self.particles, latents=latents, labels=labels, extra=extra)
        if self.record.relion_format == "3.0":
            return write_particles_star(path, None, df, version=None,
                                        particles_block=self.record.particles_block)
        return write_particles_star(path, self.optics, df, version=self.record.version or 30001)

    def predicted_pose_columns(self, predicted: tuple[np.ndarray, np.ndarray] | None) -> dict[str, np.ndarray]:
        """Columns for the orientation encoder's poses when the input had none (else nothing).

        Input poses are never overwritten (``poses = refine`` keeps them; the refined ones are in
        ``predicted_poses.npz``), so every entry point writes the same ``particles.star``.
        """
        if predicted is None or self.record.has_poses:
            return {}
        return pose_columns(predicted[0], predicted[1], self.record.pixel_size_A, self.record.relion_format)


def pose_columns(rot: np.ndarray, shift_px: np.ndarray, pixel_size_A: float, relion_format: str) -> dict:
    """RELION columns for poses in the engine convention (origins in Å for 3.1+, pixels for 3.0)."""
    a_rot, a_tilt, a_psi = rot_to_relion_euler(np.asarray(rot))
    shift = np.asarray(shift_px, dtype=np.float64)
    cols = {"rlnAngleRot": a_rot, "rlnAngleTilt": a_tilt, "rlnAnglePsi": a_psi}
    if relion_format == "3.0":
        cols.update(rlnOriginX=shift[:, 0], rlnOriginY=shift[:, 1])
    else:
        cols.update(rlnOriginXAngst=shift[:, 0] * pixel_size_A, rlnOriginYAngst=shift[:, 1] * pixel_size_A)
    return cols


# ---------------------------------------------------------------------------------------------------
# reading


def _block_lines(text: str) -> dict[str, int]:
    """1-based file line of the first data row of every loop block (for error messages)."""
    out: dict[str, int] = {}
    block = None
    in_labels = False
    seen_label = False
    for no, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if line.startswith("data_"):
            block = line[5:]
            in_labels, seen_label = False, False
            continue
        if block is None or block in out:
            continue
        if line.startswith("loop_"):
            in_labels = True
            continue
        if in_labels:
            if line.startswith("_"):
                seen_label = True
                continue
            if seen_label and line and not line.startswith("#"):
                out[block] = no
    return out


def _version_line(text: str) -> int | None:
    m = re.search(r"^#\s*version\s+(\d+)", text, flags=re.MULTILINE)
    return int(m.group(1)) if m else None


class _Ctx:
    """Error helper: formats 'FILE: particle k (line L): ...'."""

    def __init__(self, path: Path, first_line: int | None):
        self.path = path
        self.first_line = first_line

    def where(self, row: int) -> str:
        s = f"particle {row + 1}"
        if self.first_line is not None:
            s += f" (line {self.first_line + row})"
        return s

    def error(self, msg: str, row: int | None = None) -> StarFileError:
        prefix = f"{self.path}: " + (f"{self.where(row)}: " if row is not None else "")
        return StarFileError(prefix + msg)


def _numeric(df: pd.DataFrame, col: str, ctx: _Ctx, block: str) -> np.ndarray:
    """A column as float64; a value that is not a number is an error naming row and column."""
    vals = pd.to_numeric(df[col], errors="coerce").to_numpy(dtype=np.float64)
    bad = np.nonzero(~np.isfinite(vals))[0]
    if len(bad):
        r = int(bad[0])
        raise ctx.error(f"column {col} of data_{block} holds {df[col].iloc[r]!r}, not a finite number", r)
    return vals


def _parse_image_names(names: pd.Series, ctx: _Ctx, root: Path) -> tuple[list[str], np.ndarray]:
    s = names.astype(str)
    parts = s.str.split("@", n=1, expand=True)
    if parts.shape[1] != 2 or parts[1].isna().any():
        bad = int(np.nonzero(parts[1].isna().to_numpy())[0][0]) if parts.shape[1] == 2 else 0
        raise ctx.error(f"rlnImageName {s.iloc[bad]!r} is not of the form NNNNNN@stack.mrcs", bad)
    idx = pd.to_numeric(parts[0], errors="coerce").to_numpy(dtype=np.float64)
    bad = np.nonzero(~np.isfinite(idx) | (idx < 1) | (idx != np.round(idx)))[0]
    if len(bad):
        r = int(bad[0])
        raise ctx.error(f"rlnImageName {s.iloc[r]!r}: the image number before '@' must be an integer >= 1 "
                        "(RELION numbers images from 1)", r)
    files = parts[1].str.strip()
    # RELION accepts "stack.mrc:mrcs" to force stack interpretation
    files = files.str.replace(r":(mrcs?|spi)$", "", regex=True)
    empty = np.nonzero((files == "").to_numpy())[0]
    if len(empty):
        raise ctx.error(f"rlnImageName {s.iloc[int(empty[0])]!r} has no file name after '@'", int(empty[0]))
    uniq, inv = np.unique(files.to_numpy(dtype=str), return_inverse=True)
    resolved = [str(Path(u) if os.path.isabs(u) else root / u) for u in uniq]
    paths = [resolved[i] for i in inv]
    return paths, idx.astype(np.int64) - 1


def _read_tables(path: Path) -> tuple[str, dict[str, pd.DataFrame], dict]:
    if not path.exists():
        raise StarFileError(f"{path}: STAR file not found")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise StarFileError(f"{path}: cannot read ({err})") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            blocks = starfile.read(path, always_dict=True)
    except Exception as err:  # noqa: BLE001 - starfile/pandas raise many types
        raise StarFileError(f"{path}: not a readable STAR file ({type(err).__name__}: {err})") from None
    tables = {k: v for k, v in blocks.items() if isinstance(v, pd.DataFrame)}
    return text, tables, blocks


TOMO_COLUMNS = ("rlnTomoName", "rlnTomoParticleName")


def _tomography_marker(blocks: dict) -> str | None:
    """What marks a RELION 5 tomography particle file (None for single-particle data)."""
    general = blocks.get("general")
    if isinstance(general, dict) and "rlnTomoSubTomosAre2DStacks" in general:
        return "data_general has rlnTomoSubTomosAre2DStacks"
    for name, block in blocks.items():
        if not isinstance(block, pd.DataFrame):
            continue
        for col in TOMO_COLUMNS:
            if col in block.columns:
                return f"{col} in data_{name}"
        if "rlnImageDimensionality" in block.columns:
            dims = pd.to_numeric(block["rlnImageDimensionality"], errors="coerce")
            if (dims == 3).any():
                return f"rlnImageDimensionality 3 in data_{name}"
    return None


def read_particles_star(path: str | os.PathLike, root: str | os.PathLike | None = None, *,
                        check_images: bool = True, require_ctf: bool = True) -> ParticleStar:
    """Read a RELION 3.0/3.1/4.0/5.0 particle STAR file.

    ``root`` is the RELION project directory that image names are relative to (default: the current
    directory). With ``check_images`` every referenced stack is opened once (missing files, box size,
    index range); without it only the metadata is read and images are opened on first access.
    Without ``require_ctf`` particles with no CTF columns are read as CTF-free (``data.ctf`` None).
    """
    path = Path(path)
    root = Path(root) if root is not None else Path.cwd()
    b = _particle_block(path)
    opt = _optics_31(b) if b.fmt == "3.1" else _optics_30(b)
    if not opt.pixel > 0:
        raise StarFileError(f"{path}: pixel size {opt.pixel} Å is not positive")
    values = _ColumnValues(b, opt)
    ctf = _ctf(b, values, require_ctf)
    rot, shift = _poses(b, values, opt.pixel)
    source, stack_files, box = _image_source(b, root, check_images, opt.box)
    record = StarRecord(
        path=str(path), root=str(root), relion_format=b.fmt, version=b.version, particles_block=b.pblock,
        n_particles=b.n, box=box, pixel_size_A=opt.pixel, optics_groups=opt.infos, has_poses=rot is not None,
        has_ctf=ctf is not None, stack_files=stack_files, images_checked=check_images, warnings=b.notes)
    data = ParticleData(images=source, pixel_size_A=opt.pixel, ctf=ctf, rot=rot, shift_px=shift,
                        meta={"star": str(path), "optics_group": opt.group_of})
    return ParticleStar(record=record, data=data, optics=b.optics, particles=b.particles)


@dataclass
class _Block:
    """The particle table of a STAR file and where it came from (for error messages with line numbers)."""

    path: Path
    fmt: Literal["3.0", "3.1"]
    version: int | None
    pblock: str
    particles: pd.DataFrame
    optics: pd.DataFrame | None
    ctx: _Ctx
    first_lines: dict[str, int]
    notes: list[str]

    @property
    def n(self) -> int:
        return len(self.particles)


def _particle_block(path: Path) -> _Block:
    """The particle block: ``data_particles`` next to ``data_optics`` (3.1 and later), else the block
    with image names (3.0)."""
    text, tables, blocks = _read_tables(path)
    tomo = _tomography_marker(blocks)
    if tomo:
        raise StarFileError(f"{path}: RELION tomography particles ({tomo}) are not supported: cryoFormer "
                            "reconstructs single-particle images (2D stacks named NNNNNN@stack.mrcs)")
    first_lines = _block_lines(text)
    if "optics" in tables:
        fmt: Literal["3.0", "3.1"] = "3.1"
        if "particles" not in tables:
            raise StarFileError(f"{path}: has data_optics but no data_particles block "
                                f"(blocks: {', '.join('data_' + k for k in tables)})")
        pblock = "particles"
        optics = tables["optics"].reset_index(drop=True)
    else:
        fmt = "3.0"
        with_images = [k for k, v in tables.items() if "rlnImageName" in v.columns]
        if not tables:
            raise StarFileError(f"{path}: no loop block found")
        pblock = with_images[0] if with_images else ("particles" if "particles" in tables else next(iter(tables)))
        optics = None
    particles = tables[pblock].reset_index(drop=True)
    if len(particles) == 0:
        raise StarFileError(f"{path}: data_{pblock} holds no particles")
    if "rlnImageName" not in particles.columns:
        raise StarFileError(f"{path}: data_{pblock} has no rlnImageName column")
    return _Block(path, fmt, _version_line(text), pblock, particles, optics, _Ctx(path, first_lines.get(pblock)),
                  first_lines, [])


@dataclass
class _Optics:
    group_of: np.ndarray        # optics group number of each particle
    grp_rows: np.ndarray        # row of data_optics of each particle (0 for 3.0 files)
    infos: list[OpticsGroupInfo]
    pixel: float
    box: int | None
    octx: _Ctx


def _group_of_particles(b: _Block, octx: _Ctx) -> tuple[np.ndarray, dict[int, int]]:
    """(group number of each particle, data_optics row of each group number)."""
    optics, path = b.optics, b.path
    if "rlnOpticsGroup" not in optics.columns:
        raise StarFileError(f"{path}: data_optics has no rlnOpticsGroup column")
    if "rlnOpticsGroup" not in b.particles.columns:
        if len(optics) != 1:
            raise StarFileError(f"{path}: data_particles has no rlnOpticsGroup column but data_optics "
                                f"defines {len(optics)} groups")
        group_of = np.full(b.n, int(optics["rlnOpticsGroup"].iloc[0]), dtype=np.int64)
    else:
        group_of = _numeric(b.particles, "rlnOpticsGroup", b.ctx, b.pblock).astype(np.int64)
    numbers = _numeric(optics, "rlnOpticsGroup", octx, "optics").astype(np.int64)
    row_of_group = {int(k): i for i, k in enumerate(numbers)}
    missing = sorted(set(np.unique(group_of).tolist()) - set(row_of_group))
    if missing:
        r = int(np.nonzero(group_of == missing[0])[0][0])
        raise b.ctx.error(f"rlnOpticsGroup {missing[0]} is not defined in data_optics "
                          f"(defined: {', '.join(map(str, sorted(row_of_group)))})", r)
    return group_of, row_of_group


def _optics_pixel_sizes(b: _Block, octx: _Ctx) -> np.ndarray:
    optics = b.optics
    if "rlnImagePixelSize" in optics.columns:
        return _numeric(optics, "rlnImagePixelSize", octx, "optics")
    if "rlnDetectorPixelSize" in optics.columns and "rlnMagnification" in optics.columns:
        return (_numeric(optics, "rlnDetectorPixelSize", octx, "optics") * 1e4
                / _numeric(optics, "rlnMagnification", octx, "optics"))
    raise StarFileError(f"{b.path}: data_optics has no rlnImagePixelSize column (needed for the pixel size "
                        "of the particle images)")


def _optics_group_info(optics: pd.DataFrame, k: int, i: int, pixel: float, box: int | None, count: int) -> OpticsGroupInfo:
    def opt(col: str) -> float | None:
        return float(pd.to_numeric(optics[col].iloc[i], errors="coerce")) if col in optics.columns else None

    return OpticsGroupInfo(
        number=k, name=str(optics["rlnOpticsGroupName"].iloc[i]) if "rlnOpticsGroupName" in optics.columns
        else f"opticsGroup{k}", pixel_size_A=pixel, box=box, voltage_kv=opt("rlnVoltage"),
        cs_mm=opt("rlnSphericalAberration"), amp_contrast=opt("rlnAmplitudeContrast"), n_particles=count)


def _check_optics_flags(b: _Block, used: list[int], row_of_group: dict[int, int]) -> None:
    """Premultiplied images are refused; aberrations cryoFormer does not model are noted."""
    optics = b.optics
    col = "rlnCtfDataAreCtfPremultiplied"
    if col in optics.columns:
        flags = pd.to_numeric(optics[col], errors="coerce").iloc[[row_of_group[k] for k in used]]
        if (flags == 1).any():
            bad = [k for k, f in zip(used, flags) if f == 1]
            raise StarFileError(f"{b.path}: optics group(s) {', '.join(map(str, bad))} have {col} = 1; cryoFormer "
                                "needs images that are not CTF-premultiplied (re-extract without premultiplication)")
    for col, what in (("rlnBeamTiltX", "beam tilt"), ("rlnOddZernike", "odd Zernike (anisotropic) aberrations"),
                      ("rlnEvenZernike", "even Zernike aberrations"), ("rlnMagMat00", "anisotropic magnification")):
        if col in optics.columns:
            b.notes.append(f"{what} ({col} in data_optics) is ignored by cryoFormer")


def _optics_31(b: _Block) -> _Optics:
    """RELION 3.1 and later: pixel size, box and microscope per optics group in data_optics."""
    optics = b.optics
    octx = _Ctx(b.path, b.first_lines.get("optics"))
    group_of, row_of_group = _group_of_particles(b, octx)
    opix = _optics_pixel_sizes(b, octx)
    obox = (_numeric(optics, "rlnImageSize", octx, "optics").astype(np.int64)
            if "rlnImageSize" in optics.columns else None)
    used = sorted(set(np.unique(group_of).tolist()))
    infos = [_optics_group_info(optics, k, row_of_group[k], float(opix[row_of_group[k]]),
                                int(obox[row_of_group[k]]) if obox is not None else None, int(np.sum(group_of == k)))
             for k in used]
    _check_groups_agree(b.path, infos)
    grp_rows = np.array([row_of_group[int(k)] for k in group_of], dtype=np.int64)
    _check_optics_flags(b, used, row_of_group)
    return _Optics(group_of, grp_rows, infos, infos[0].pixel_size_A, infos[0].box, octx)


def _optics_30(b: _Block) -> _Optics:
    """RELION 3.0: pixel size per particle (must be one), no optics table."""
    pcols, ctx, n = b.particles.columns, b.ctx, b.n
    if "rlnImagePixelSize" in pcols:
        pix = _numeric(b.particles, "rlnImagePixelSize", ctx, b.pblock)
        pcol = "rlnImagePixelSize"
    elif "rlnDetectorPixelSize" in pcols and "rlnMagnification" in pcols:
        pix = (_numeric(b.particles, "rlnDetectorPixelSize", ctx, b.pblock) * 1e4
               / _numeric(b.particles, "rlnMagnification", ctx, b.pblock))
        pcol = "rlnDetectorPixelSize * 1e4 / rlnMagnification"
    else:
        raise StarFileError(f"{b.path}: RELION 3.0 STAR file (no data_optics) without a pixel size: needs "
                            "rlnImagePixelSize or rlnDetectorPixelSize + rlnMagnification")
    off = np.nonzero(np.abs(pix - pix[0]) > PIXEL_TOL * pix[0])[0]
    if len(off):
        r = int(off[0])
        raise ctx.error(f"pixel size {pix[r]:.6g} Å ({pcol}) differs from particle 1's {pix[0]:.6g} Å; "
                        "cryoFormer trains one pixel size at a time", r)
    pixel = float(pix[0])
    box = int(_numeric(b.particles, "rlnImageSize", ctx, b.pblock)[0]) if "rlnImageSize" in pcols else None
    infos = [OpticsGroupInfo(number=1, name="(RELION 3.0: per particle)", pixel_size_A=pixel, box=box,
                             voltage_kv=None, cs_mm=None, amp_contrast=None, n_particles=n)]
    return _Optics(np.ones(n, dtype=np.int64), np.zeros(n, dtype=np.int64), infos, pixel, box, ctx)


class _ColumnValues:
    """A value per particle: its own column, else its optics group's column, else a default."""

    def __init__(self, b: _Block, opt: _Optics) -> None:
        self.b, self.opt = b, opt

    def has(self, col: str) -> bool:
        return col in self.b.particles.columns or (self.b.optics is not None and col in self.b.optics.columns)

    def __call__(self, col: str, default: float | None) -> np.ndarray | None:
        """``default`` None: None when the column is absent."""
        b = self.b
        if col in b.particles.columns:
            return _numeric(b.particles, col, b.ctx, b.pblock)
        if b.optics is not None and col in b.optics.columns:
            return _numeric(b.optics, col, self.opt.octx, "optics")[self.opt.grp_rows]
        if default is None:
            return None
        return np.full(b.n, float(default))


def _ctf(b: _Block, value: _ColumnValues, require_ctf: bool) -> CTFParams | None:
    du = value("rlnDefocusU", None)
    if du is None:
        if require_ctf:
            raise StarFileError(f"{b.path}: the particles have no CTF parameters (no rlnDefocusU column). {NO_CTF_HINT}")
        return None
    kv = value("rlnVoltage", None)
    cs = value("rlnSphericalAberration", None)
    for col, arr in (("rlnVoltage", kv), ("rlnSphericalAberration", cs)):
        if arr is None:
            where = "data_optics or data_particles" if b.fmt == "3.1" else f"data_{b.pblock}"
            raise StarFileError(f"{b.path}: has rlnDefocusU but no {col} (in {where}); the CTF needs it")
    dv = value("rlnDefocusV", None)
    ctf = CTFParams(
        defocus_u_A=du, defocus_v_A=du.copy() if dv is None else dv,
        defocus_angle_deg=value("rlnDefocusAngle", 0.0), voltage_kv=kv, cs_mm=cs,
        amp_contrast=value("rlnAmplitudeContrast", 0.0), phase_shift_deg=value("rlnPhaseShift", 0.0),
        bfactor=value("rlnCtfBfactor", 0.0), scale=value("rlnCtfScalefactor", 1.0))
    if not value.has("rlnAmplitudeContrast"):
        b.notes.append("no rlnAmplitudeContrast: using RELION's default 0")
    return ctf


def _poses(b: _Block, value: _ColumnValues, pixel: float) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(rot, shift_px) from the Euler angles and origins (Å from 3.1 on, pixels before), or (None, None)."""
    ang_cols = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
    pcols = b.particles.columns
    present = [c for c in ang_cols if c in pcols]
    if not present:
        return None, None
    if len(present) != 3:
        miss = [c for c in ang_cols if c not in pcols]
        raise StarFileError(f"{b.path}: data_{b.pblock} has {', '.join(present)} but not {', '.join(miss)}")
    rot = relion_euler_to_rot(*[_numeric(b.particles, c, b.ctx, b.pblock) for c in ang_cols])
    if "rlnOriginXAngst" in pcols or "rlnOriginYAngst" in pcols:
        ox = value("rlnOriginXAngst", 0.0) / pixel
        oy = value("rlnOriginYAngst", 0.0) / pixel
    else:  # pre-3.1 origins, in pixels
        ox = value("rlnOriginX", 0.0)
        oy = value("rlnOriginY", 0.0)
    return rot, np.stack([ox, oy], axis=1)


def _image_source(b: _Block, root: Path, check_images: bool,
                  box: int | None) -> tuple[MrcStackSource, list[str], int | None]:
    """The lazy image source, the stack files, and the box (from the stacks when they are checked)."""
    path, ctx = b.path, b.ctx
    paths, index0 = _parse_image_names(b.particles["rlnImageName"], ctx, root)
    stack_files = sorted(set(paths))
    if check_images:
        for f in stack_files:
            if not Path(f).exists():
                r = paths.index(f)
                raise ctx.error(f"image stack {f} (from rlnImageName {b.particles['rlnImageName'].iloc[r]!r}, "
                                f"relative to the project directory {root}) does not exist", r)
    try:
        source = MrcStackSource(paths, index0, check=check_images, origin=str(path), first_line=ctx.first_line)
    except ImageStackError as err:
        raise StarFileError(f"{path}: {err}") from None
    if check_images:
        if box is not None and source.box != box:
            raise StarFileError(f"{path}: rlnImageSize is {box} but the image stacks hold "
                                f"{source.box}x{source.box} images ({stack_files[0]})")
        box = source.box
    return source, stack_files, box


def _check_groups_agree(path: Path, infos: list[OpticsGroupInfo]) -> None:
    def describe(groups: list[OpticsGroupInfo]) -> str:
        return ", ".join(f"{g.number} ({g.name}, {g.n_particles} particles)" for g in groups)

    problems = []
    by_pix: dict[float, list[OpticsGroupInfo]] = {}
    for g in infos:
        key = next((p for p in by_pix if abs(p - g.pixel_size_A) <= PIXEL_TOL * p), g.pixel_size_A)
        by_pix.setdefault(key, []).append(g)
    if len(by_pix) > 1:
        problems.append("pixel size: " + "; ".join(f"{p:g} Å in groups {describe(gs)}" for p, gs in by_pix.items()))
    by_box: dict[int | None, list[OpticsGroupInfo]] = {}
    for g in infos:
        by_box.setdefault(g.box, []).append(g)
    if len(by_box) > 1:
        problems.append("box (rlnImageSize): " + "; ".join(f"{b} px in groups {describe(gs)}"
                                                           for b, gs in by_box.items()))
    if problems:
        raise StarFileError(
            f"{path}: the optics groups used by the particles differ in " + " and in ".join(problems)
            + ". cryoFormer trains particles of one pixel size and box together: select a consistent set of "
              "optics groups first (e.g. relion_star_handler --select rlnOpticsGroup --minval G --maxval G, or a "
              "Subset selection job), or re-extract/rescale the particles to a common pixel size and box.")


# ---------------------------------------------------------------------------------------------------
# writing


def _format_column(s: pd.Series) -> np.ndarray:
    if pd.api.types.is_bool_dtype(s):
        return np.where(s.to_numpy(), "1", "0")
    if pd.api.types.is_integer_dtype(s):
        return s.astype(np.int64).astype(str).to_numpy()
    if pd.api.types.is_float_dtype(s):
        arr = s.to_numpy(dtype=np.float64)
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"column {s.name} holds NaN or infinite values")
        return np.char.mod("%.10g", arr)
    out = s.astype(str).to_numpy(dtype=object)
    res = np.empty(len(out), dtype=object)
    for i, v in enumerate(out):
        if v == "" or any(c.isspace() for c in v):
            if '"' in v:
                raise ValueError(f"column {s.name}: value {v!r} cannot be written to a STAR file")
            v = f'"{v}"'
        res[i] = v
    return res.astype(str)


def _loop_text(name: str, df: pd.DataFrame, version: int | None) -> str:
    head = f"\n# version {version}\n" if version is not None else "\n"
    lines = [head, f"data_{name}", "", "loop_"]
    for i, col in enumerate(df.columns, start=1):
        lines.append(f"_{col} #{i}")
    cols = [_format_column(df[c]) for c in df.columns]
    if len(df):
        rows = cols[0].astype(object)
        for c in cols[1:]:
            rows = rows + " " + c.astype(object)
        lines.extend(rows.tolist())
    return "\n".join(lines) + "\n\n"


def write_particles_star(path: str | os.PathLike, optics_df: pd.DataFrame | None, particles_df: pd.DataFrame,
                         *, version: int | None = 30001, particles_block: str = "particles") -> Path:
    """Write a particle STAR file atomically in RELION's layout.

    With ``optics_df`` it is the 3.1+ two-block format (``data_optics`` then ``data_particles``, each
    preceded by ``# version {version}``: 30001 for RELION 3.1/4.0, 50001 for 5.0). With
    ``optics_df=None`` it is a RELION 3.0 single block named ``particles_block`` and ``version`` should
    be None (RELION 3.1 refuses to convert a one-block file that has a version line).
    """
    for df in (optics_df, particles_df):
        if df is not None:
            bad = [c for c in df.columns if not isinstance(c, str) or not c or any(ch.isspace() for ch in c)]
            if bad:
                raise ValueError(f"invalid STAR column names: {bad}")
    text = "\n"
    if optics_df is not None:
        text += _loop_text("optics", optics_df, version)
    text += _loop_text(particles_block, particles_df, version)
    return atomic_write_text(path, text)


def latent_columns(zdim: int) -> list[str]:
    return [f"{LATENT_PREFIX}{i}" for i in range(1, zdim + 1)]


def add_result_columns(particles_df: pd.DataFrame, *, latents: np.ndarray | None = None,
                       labels: np.ndarray | None = None,
                       extra: Mapping[str, np.ndarray] | None = None) -> pd.DataFrame:
    """A copy of ``particles_df`` with ``rlnCryoformerZ1..K`` (latents) and ``rlnClassNumber``.

    ``labels`` are 0-based k-means classes; RELION's ``rlnClassNumber`` is 1-based. Latent columns of an
    earlier cryoFormer run are replaced. RELION 3.1 keeps unknown labels such as ``rlnCryoformerZ1``
    through its tools ("will ignore (but maintain) values for the unknown label").
    """
    df = particles_df.copy()
    n = len(df)
    if latents is not None:
        z = np.asarray(latents, dtype=np.float64)
        if z.ndim == 1:
            z = z[:, None]
        if z.shape[0] != n:
            raise ValueError(f"{z.shape[0]} latent rows for {n} particles")
        df = df.drop(columns=[c for c in df.columns if re.fullmatch(LATENT_PREFIX + r"\d+", str(c))])
        for name, col in zip(latent_columns(z.shape[1]), z.T):
            df[name] = col
    if labels is not None:
        lab = np.asarray(labels)
        if lab.shape != (n,):
            raise ValueError(f"labels must have shape ({n},), got {lab.shape}")
        df[CLASS_LABEL] = lab.astype(np.int64) + 1
    for name, col in (extra or {}).items():
        col = np.asarray(col)
        if col.shape[0] != n:
            raise ValueError(f"column {name}: {col.shape[0]} values for {n} particles")
        df[name] = col
    return df


def write_simulated_star(path: str | os.PathLike, *, rot: np.ndarray, shift_px: np.ndarray | None,
                         ctf: CTFParams | None, pixel_size_A: float, box: int, stack_path: str,
                         extra_columns: Mapping[str, np.ndarray] | None = None,
                         optics_group_name: str = "opticsGroup1") -> Path:
    """A RELION 3.1 particle STAR for simulated data; image ``k`` (0-based) is ``{k+1:06d}@stack_path``.

    ``rot``/``shift_px`` follow :mod:`cryoformer.poses`. Voltage, Cs and amplitude contrast must be the
    same for all particles (they go to the one optics group); the other CTF values are per particle.
    ``rlnRandomSubset`` alternates 1, 2 so that RELION's half-set tools work.
    """
    rot = np.asarray(rot, dtype=np.float64)
    n = rot.shape[0]
    shift = np.zeros((n, 2)) if shift_px is None else np.asarray(shift_px, dtype=np.float64)
    if shift.shape != (n, 2):
        raise ValueError(f"shift_px must have shape ({n}, 2)")
    optics = {"rlnOpticsGroupName": [optics_group_name], "rlnOpticsGroup": [1]}
    if ctf is not None:
        if len(ctf) != n:
            raise ValueError(f"{len(ctf)} CTF rows for {n} poses")
        for col, arr in (("rlnVoltage", ctf.voltage_kv), ("rlnSphericalAberration", ctf.cs_mm),
                         ("rlnAmplitudeContrast", ctf.amp_contrast)):
            if np.ptp(arr) > 0:
                raise ValueError(f"{col} must be the same for all particles (one optics group)")
            optics[col] = [float(arr[0])]
    optics.update({"rlnImagePixelSize": [float(pixel_size_A)], "rlnImageSize": [int(box)],
                   "rlnImageDimensionality": [2]})
    e_rot, e_tilt, e_psi = rot_to_relion_euler(rot)
    parts: dict[str, np.ndarray] = {
        "rlnImageName": np.array([f"{k + 1:06d}@{stack_path}" for k in range(n)]),
        "rlnAngleRot": e_rot, "rlnAngleTilt": e_tilt, "rlnAnglePsi": e_psi,
        "rlnOriginXAngst": shift[:, 0] * pixel_size_A, "rlnOriginYAngst": shift[:, 1] * pixel_size_A,
    }
    if ctf is not None:
        parts.update({"rlnDefocusU": ctf.defocus_u_A, "rlnDefocusV": ctf.defocus_v_A,
                      "rlnDefocusAngle": ctf.defocus_angle_deg, "rlnPhaseShift": ctf.phase_shift_deg,
                      "rlnCtfBfactor": ctf.bfactor, "rlnCtfScalefactor": ctf.scale})
    parts["rlnOpticsGroup"] = np.ones(n, dtype=np.int64)
    parts["rlnRandomSubset"] = (np.arange(n) % 2 + 1).astype(np.int64)
    for name, col in (extra_columns or {}).items():
        col = np.asarray(col)
        if col.shape[0] != n:
            raise ValueError(f"column {name}: {col.shape[0]} values for {n} particles")
        if col.ndim == 2:
            for j in range(col.shape[1]):
                parts[f"{name}{j + 1}"] = col[:, j]
        else:
            parts[name] = col
    return write_particles_star(path, pd.DataFrame(optics), pd.DataFrame(parts), version=30001)


__all__ = [
    "StarFileError", "StarRecord", "OpticsGroupInfo", "ParticleStar", "read_particles_star",
    "write_particles_star", "add_result_columns", "pose_columns", "latent_columns", "write_simulated_star",
    "LATENT_PREFIX", "CLASS_LABEL",
]
