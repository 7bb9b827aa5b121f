"""cryoSPARC ``.cs`` particle datasets <-> the engine's :class:`~cryoformer.data.ParticleData`.

This is the ONE module that knows cryoSPARC's field conventions (see ``docs/cryosparc.md``, which
cites the cryosparc-tools source they were read from). It talks to no server: it converts a
:class:`cryosparc.dataset.Dataset` (loaded from a file, or handed over by the live adapter) and builds
the datasets and result-group manifests that go back to cryoSPARC.

Input conventions
    * ``blob/path``: stack path relative to the project directory; one leading ``>`` (exported results)
      is stripped. ``blob/idx`` is the 0-based image index in that stack. ``blob/psize_A`` is the pixel
      size of the stored images, ``blob/shape`` their size.
    * ``alignments3D/pose``: axis-angle vector in radians that rotates the particle frame into the
      volume frame -> :func:`cryoformer.poses.cryosparc_pose_to_rot`.
    * ``alignments3D/shift``: pixels at ``alignments3D/psize_A``; in pixels of the stored image this is
      ``shift * psize_align / psize_blob`` (same sign as RELION's origin).
    * ``ctf/*``: Å and radians -> :class:`~cryoformer.data.CTFParams` (RELION units, degrees).
    * ``blob/sign`` is recorded in ``ParticleData.meta`` but not applied (images are used as stored,
      exactly like the RELION path and cryoDRGN; its exact semantics are unverified).

Output conventions
    * latent coordinate ``k`` -> slot ``components_mode_<k>`` (dtype ``components``) with fields
      ``components_mode_<k>/component`` (= k) and ``components_mode_<k>/value``.
    * a map -> one row with ``map/path`` (project- or ``>``-relative), ``map/shape``, ``map/psize_A``.
"""

from __future__ import annotations

import datetime as _dt
import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import mrcfile
import numpy as np
import yaml
from cryosparc.dataset import Dataset

from cryoformer.data import CTFParams, ParticleData
from cryoformer.poses import cryosparc_pose_to_rot, rot_to_cryosparc_pose
from cryoformer_ext.formats.mrc_stack import ImageStackError, MrcStackSource
from cryoformer_ext.formats.atomic import atomic_path, atomic_write_text
from cryoformer_ext.config import NO_CTF_HINT


class CsInputError(ValueError):
    """A particle dataset cannot be used; the message says what is wrong and where."""


BLOB_FIELDS = ("blob/path", "blob/idx", "blob/shape", "blob/psize_A")
CTF_FIELDS = ("ctf/df1_A", "ctf/df2_A", "ctf/df_angle_rad", "ctf/accel_kv", "ctf/cs_mm", "ctf/amp_contrast")
CTF_OPTIONAL = {"ctf/phase_shift_rad": 0.0, "ctf/bfactor": 0.0, "ctf/scale": 1.0}
#: higher-order optics the engine does not model; a warning is logged when any is non-zero
CTF_UNMODELLED = ("ctf/shift_A", "ctf/tilt_A", "ctf/trefoil_A", "ctf/tetra_A", "ctf/anisomag")
POSE_FIELDS = ("alignments3D/pose", "alignments3D/shift")

#: default numpy dtypes for the latent fields in OFFLINE output (live mode takes them from the server's
#: ``alloc_output``). Those of 3D Variability / 3D Flex outputs are believed to be u4/f4 (unverified).
COMPONENT_DTYPE = "<u4"
VALUE_DTYPE = "<f4"

PARTICLE_SLOTS_IN = ("blob", "ctf", "alignments3D")


# ----------------------------------------------------------------------------------------------------
# reading


def load_cs(path: str | os.PathLike) -> Dataset:
    """Load a ``.cs`` file with a clear error for a missing or unreadable file."""
    path = Path(path)
    if not path.is_file():
        raise CsInputError(f"{path}: particle .cs file not found")
    try:
        return Dataset.load(path)
    except Exception as err:  # noqa: BLE001 - Dataset.load raises several types
        raise CsInputError(f"{path}: cannot read as a cryoSPARC .cs dataset ({err})") from None


def strip_export_prefix(raw: str) -> tuple[str, bool]:
    """``('>J1/x.mrcs')`` -> ``('J1/x.mrcs', True)``: one leading ``>`` marks an exported path."""
    raw = raw.decode() if isinstance(raw, bytes) else str(raw)
    if raw.startswith(">"):
        return raw[1:], True
    return raw, False


def resolve_blob_path(raw: str, project_dir: str | os.PathLike, export_dir: str | os.PathLike | None = None) -> Path:
    """Local path of a ``blob/path`` value.

    Relative to ``project_dir``; a ``>``-prefixed (exported) path that does not exist there is tried
    relative to ``export_dir`` (the folder of the ``.cs``/``.csg`` it came from) as well.
    """
    rel, exported = strip_export_prefix(raw)
    first = Path(project_dir) / rel
    if exported and export_dir is not None and not first.exists():
        alt = Path(export_dir) / rel
        if alt.exists():
            return alt
    return first


def missing_fields(dset: Dataset, names: Iterable[str]) -> list[str]:
    have = set(dset.fields())
    return [n for n in names if n not in have]


def has_poses(dset: Dataset) -> bool:
    return not missing_fields(dset, POSE_FIELDS)


def _single_value(dset: Dataset, name: str, what: str, source: str) -> float:
    vals = np.asarray(dset[name], dtype=np.float64)
    uniq = np.unique(np.round(vals, 5))
    if len(uniq) > 1:
        raise CsInputError(f"{source}: particles have different {what} ({', '.join(f'{v:g}' for v in uniq[:5])}); "
                           "cryoFormer needs one value for the whole particle set (re-extract or split the set)")
    return float(vals[0])


def check_box(dset: Dataset, source: str) -> int:
    """The one image box of the set, from ``blob/shape``; error naming the sizes when they differ."""
    shape = np.asarray(dset["blob/shape"]).reshape(len(dset), -1)
    if len(shape) == 0:
        raise CsInputError(f"{source}: the particle dataset has no rows")
    if np.any(shape[:, 0] != shape[:, -1]):
        bad = int(np.nonzero(shape[:, 0] != shape[:, -1])[0][0])
        raise CsInputError(f"{source}: particle {bad} has non-square images ({shape[bad].tolist()})")
    boxes, counts = np.unique(shape[:, 0], return_counts=True)
    if len(boxes) > 1:
        desc = ", ".join(f"{int(b)} px ({int(c)} particles)" for b, c in zip(boxes, counts))
        raise CsInputError(f"{source}: particles have mixed box sizes: {desc}; cryoFormer needs one box size "
                           "(re-extract all particles with the same box, or Downsample Particles to one size)")
    return int(boxes[0])


def _check_finite(dset: Dataset, names: Iterable[str], source: str) -> None:
    """NaN/inf in a CTF or pose field: name the particle (row and uid) and the field, before any training."""
    for name in names:
        if name not in dset.fields():
            continue
        vals = np.asarray(dset[name], dtype=np.float64).reshape(len(dset), -1)
        bad = np.nonzero(~np.isfinite(vals).all(axis=1))[0]
        if len(bad):
            r = int(bad[0])
            more = f" (and {len(bad) - 1} more particles)" if len(bad) > 1 else ""
            raise CsInputError(f"{source}: particle {r} (uid {int(dset['uid'][r])}): {name} is "
                               f"{vals[r].tolist() if vals.shape[1] > 1 else vals[r, 0]}, not a finite number{more}")


def ctf_from_dataset(dset: Dataset, source: str = "particles", *, require: bool = True) -> CTFParams | None:
    """``ctf/*`` (Å, radians) -> :class:`CTFParams` (Å, degrees).

    No ``ctf/*`` field at all gives None when ``require`` is false (job parameter ``ctf = no``): the same
    rule as for RELION particles without CTF columns. Some fields but not all is always an error.
    """
    miss = missing_fields(dset, CTF_FIELDS)
    if len(miss) == len(CTF_FIELDS) and not require:
        return None
    if miss:
        raise CsInputError(f"{source}: the particles have no CTF parameters (missing {', '.join(miss)}); "
                           "use particles extracted from CTF-estimated micrographs, or import them with CTF. "
                           + NO_CTF_HINT)
    _check_finite(dset, list(CTF_FIELDS) + list(CTF_OPTIONAL), source)

    def col(name: str, default: float | None = None) -> np.ndarray:
        if name in dset.fields():
            return np.asarray(dset[name], dtype=np.float64)
        return np.full(len(dset), default, dtype=np.float64)

    return CTFParams(
        defocus_u_A=col("ctf/df1_A"),
        defocus_v_A=col("ctf/df2_A"),
        defocus_angle_deg=np.rad2deg(col("ctf/df_angle_rad")),
        voltage_kv=col("ctf/accel_kv"),
        cs_mm=col("ctf/cs_mm"),
        amp_contrast=col("ctf/amp_contrast"),
        phase_shift_deg=np.rad2deg(col("ctf/phase_shift_rad", CTF_OPTIONAL["ctf/phase_shift_rad"])),
        bfactor=col("ctf/bfactor", CTF_OPTIONAL["ctf/bfactor"]),
        scale=col("ctf/scale", CTF_OPTIONAL["ctf/scale"]),
    )


def unmodelled_ctf_terms(dset: Dataset) -> list[str]:
    """Names of higher-order CTF fields that are present and non-zero (the engine ignores them)."""
    out = []
    for name in CTF_UNMODELLED:
        if name in dset.fields():
            vals = np.asarray(dset[name], dtype=np.float64)
            ref = np.zeros_like(vals)
            if name == "ctf/anisomag" and vals.ndim == 2 and vals.shape[1] == 4:
                # identity magnification matrix is also "nothing to correct"
                ident = np.array([1.0, 0.0, 0.0, 1.0])
                if np.allclose(vals, ref) or np.allclose(vals, ident):
                    continue
            if not np.allclose(vals, ref):
                out.append(name)
    return out


def poses_from_dataset(dset: Dataset, blob_psize_A: float) -> tuple[np.ndarray, np.ndarray]:
    """``alignments3D/pose, shift, psize_A`` -> engine ``rot`` (N,3,3) and ``shift_px`` (N,2) in blob pixels."""
    rot = cryosparc_pose_to_rot(np.asarray(dset["alignments3D/pose"], dtype=np.float64))
    shift = np.asarray(dset["alignments3D/shift"], dtype=np.float64).reshape(len(dset), 2)
    if "alignments3D/psize_A" in dset.fields():
        psize_align = np.asarray(dset["alignments3D/psize_A"], dtype=np.float64)
        psize_align = np.where(psize_align > 0, psize_align, blob_psize_A)
    else:
        psize_align = np.full(len(dset), blob_psize_A)
    shift_px = shift * (psize_align / blob_psize_A)[:, None]
    return rot, shift_px


def poses_to_fields(rot: np.ndarray, shift_px: np.ndarray, blob_psize_A: float,
                    align_psize_A: float | None = None) -> dict[str, np.ndarray]:
    """Inverse of :func:`poses_from_dataset`: values for ``alignments3D/pose``, ``shift``, ``psize_A``."""
    align = blob_psize_A if align_psize_A is None else align_psize_A
    return {
        "alignments3D/pose": rot_to_cryosparc_pose(rot).astype(np.float32),
        "alignments3D/shift": (np.asarray(shift_px, np.float64) * blob_psize_A / align).astype(np.float32),
        "alignments3D/psize_A": np.full(len(rot), align, np.float32),
    }


@dataclass
class CsParticles:
    """A particle set read from cryoSPARC: engine data plus the untouched input dataset."""

    data: ParticleData
    dataset: Dataset
    stack_files: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def particles_from_dataset(dset: Dataset, project_dir: str | os.PathLike, *, source: str = "particles",
                           export_dir: str | os.PathLike | None = None, use_poses: bool = True,
                           check_stacks: bool = True, require_ctf: bool = True) -> CsParticles:
    """Build :class:`ParticleData` from a particle dataset; images stay on disk (lazy memmap).

    Raises :class:`CsInputError` for missing blob/CTF fields, mixed box or pixel sizes and missing or
    unreadable stack files. Poses are used when ``alignments3D/pose`` and ``shift`` are present and
    ``use_poses`` is true; otherwise ``rot``/``shift_px`` are ``None`` (orientation encoder).
    """
    project_dir = Path(project_dir)
    miss = missing_fields(dset, BLOB_FIELDS)
    if miss:
        raise CsInputError(f"{source}: not a particle image dataset (missing {', '.join(miss)})")
    n = len(dset)
    if n == 0:
        raise CsInputError(f"{source}: the particle dataset has no rows")
    box = check_box(dset, source)
    psize = _single_value(dset, "blob/psize_A", "pixel sizes (blob/psize_A)", source)
    if not psize > 0:
        raise CsInputError(f"{source}: blob/psize_A is {psize}, expected a positive pixel size in Å")
    ctf = ctf_from_dataset(dset, source, require=require_ctf)

    raw_paths = [strip_export_prefix(p) for p in dset["blob/path"]]
    uniq_raw = sorted(set(raw_paths))
    resolved_of = {}
    for rel, exported in uniq_raw:
        resolved_of[(rel, exported)] = resolve_blob_path((">" if exported else "") + rel, project_dir, export_dir)
    missing = [(r, p) for r, p in resolved_of.items() if not p.is_file()]
    if missing:
        (rel, exported), p = missing[0]
        shown = (">" if exported else "") + rel
        more = f" (and {len(missing) - 1} more of {len(resolved_of)} stack files)" if len(missing) > 1 else ""
        raise CsInputError(f"{source}: particle stack file not found: {p}{more}; from blob/path '{shown}' resolved "
                           f"against the project directory {project_dir}. Give the project directory as this "
                           "machine sees it (--project-dir)")
    paths = [resolved_of[rp] for rp in raw_paths]
    idx = np.asarray(dset["blob/idx"], dtype=np.int64)
    try:
        images = MrcStackSource(paths, idx, check=check_stacks, origin=source)
    except ImageStackError as err:
        raise CsInputError(f"{source}: {err}") from None
    if check_stacks and images.box != box:
        raise CsInputError(f"{source}: blob/shape says {box} px but the stack files hold {images.box} px images")

    rot = shift_px = None
    if use_poses and has_poses(dset):
        _check_finite(dset, POSE_FIELDS, source)
        rot, shift_px = poses_from_dataset(dset, psize)

    warn = []
    terms = unmodelled_ctf_terms(dset)
    if terms:
        warn.append(f"{source}: non-zero {', '.join(terms)} are ignored (cryoFormer models defocus, astigmatism, "
                    "Cs, amplitude contrast and phase shift only)")
    meta = {
        "source": source,
        "uid": np.asarray(dset["uid"]),
        "blob_sign": np.asarray(dset["blob/sign"]) if "blob/sign" in dset.fields() else None,
        "format": "cryosparc",
    }
    data = ParticleData(images=images, pixel_size_A=psize, ctf=ctf, rot=rot, shift_px=shift_px, meta=meta)
    return CsParticles(data=data, dataset=dset, stack_files=sorted(set(paths)), warnings=warn)


# ----------------------------------------------------------------------------------------------------
# writing


def component_slot(k: int) -> str:
    return f"components_mode_{k}"


def component_slots(zdim: int) -> list[dict]:
    """Output slot specs for ``zdim`` latent coordinates (one ``components`` slot each)."""
    return [{"name": component_slot(k), "dtype": "components"} for k in range(zdim)]


def fill_components(dset: Dataset, latents: np.ndarray) -> Dataset:
    """Write latent coordinates into existing ``components_mode_<k>/{component,value}`` fields (in place).

    The field dtypes are whatever the dataset has (live: the server's ``alloc_output``).
    """
    lat = np.asarray(latents)
    if lat.ndim != 2 or lat.shape[0] != len(dset):
        raise ValueError(f"latents must be ({len(dset)}, zdim), got {lat.shape}")
    for k in range(lat.shape[1]):
        slot = component_slot(k)
        for f in ("component", "value"):
            if f"{slot}/{f}" not in dset.fields():
                raise ValueError(f"dataset has no field {slot}/{f}")
        comp = dset[f"{slot}/component"]
        comp[:] = np.asarray(k).astype(comp.dtype)
        val = dset[f"{slot}/value"]
        val[:] = lat[:, k].astype(val.dtype)
    return dset


def add_components(dset: Dataset, latents: np.ndarray, *, component_dtype: str = COMPONENT_DTYPE,
                   value_dtype: str = VALUE_DTYPE) -> Dataset:
    """A copy of ``dset`` with ``components_mode_<k>`` fields added (replaced if present) and filled."""
    lat = np.asarray(latents)
    out = dset.copy()
    existing = [f for f in out.fields() if f.startswith("components_mode_")]
    if existing:
        out.drop_fields(existing)
    names, dtypes = [], []
    for k in range(lat.shape[1]):
        names += [f"{component_slot(k)}/component", f"{component_slot(k)}/value"]
        dtypes += [component_dtype, value_dtype]
    if names:
        out.add_fields(names, dtypes)
    return fill_components(out, lat)


def mrc_shape(path: str | os.PathLike) -> tuple[int, int, int]:
    """(nz, ny, nx) of an MRC map from its header."""
    with mrcfile.open(path, mode="r", header_only=True, permissive=True) as mrc:
        h = mrc.header
        return int(h.nz), int(h.ny), int(h.nx)


def fill_volume(dset: Dataset, map_path: str, shape: Sequence[int], psize_A: float) -> Dataset:
    """Fill row 0 of a one-row volume dataset (fields ``map/path``, ``map/shape``, ``map/psize_A``)."""
    if len(dset) != 1:
        raise ValueError(f"a volume dataset has one row, got {len(dset)}")
    dset["map/path"][0] = map_path
    dset["map/shape"][0] = np.asarray(shape).astype(dset["map/shape"].dtype)
    dset["map/psize_A"][0] = psize_A
    return dset


def volume_dataset(map_path: str, shape: Sequence[int], psize_A: float) -> Dataset:
    """A new one-row volume dataset (offline output; live mode fills one from ``alloc_output``)."""
    dset = Dataset.allocate(1, [("map/path", "O"), ("map/shape", "<u4", (3,)), ("map/psize_A", "<f4")])
    return fill_volume(dset, map_path, shape, psize_A)


def mask_dataset(mask_path: str, shape: Sequence[int], psize_A: float) -> Dataset:
    """A one-row mask dataset (slot ``mask``: ``mask/path``, ``mask/shape``, ``mask/psize_A``), the result
    cryoSPARC's mask outputs carry and its refinements' ``mask`` inputs take."""
    dset = Dataset.allocate(1, [("mask/path", "O"), ("mask/shape", "<u4", (3,)), ("mask/psize_A", "<f4")])
    dset["mask/path"][0] = mask_path
    dset["mask/shape"][0] = np.asarray(shape).astype(dset["mask/shape"].dtype)
    dset["mask/psize_A"][0] = psize_A
    return dset


_NAME_RE = re.compile(r"[^0-9A-Za-z_]+")


def output_name(name: str, prefix: str = "volume_") -> str:
    """A valid cryoSPARC output group name (``^[A-Za-z][0-9A-Za-z_]*$``) from a free-form map name."""
    clean = _NAME_RE.sub("_", str(name)).strip("_") or "map"
    out = prefix + clean if prefix else clean
    if not out[0].isalpha():
        out = "v_" + out
    return out


def save_dataset(path: str | os.PathLike, dset: Dataset) -> Path:
    """Save a dataset atomically in cryoSPARC's default (numpy) ``.cs`` format."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            dset.save(fh)
    return Path(path)


def dataset_slots(dset: Dataset) -> list[str]:
    """Slot names (field prefixes) of a dataset, in field order, without ``uid``."""
    seen: list[str] = []
    for f in dset.fields():
        if "/" in f:
            p = f.split("/", 1)[0]
            if p not in seen:
                seen.append(p)
    return seen


def slot_dtype(slot: str) -> str:
    """Slot dtype of a slot name: ``components_mode_3`` -> ``components``, ``alignments_class_0`` ->
    ``alignments3D``, otherwise the name itself (``blob``, ``ctf``, ``alignments3D`` ...)."""
    if slot.startswith("components_mode_"):
        return "components"
    if slot.startswith("alignments_class_"):
        return "alignments3D"
    if slot in ("map", "map_sharp", "map_half_A", "map_half_B", "mask"):
        return "blob"
    return slot


def csg_text(*, group_name: str, group_type: str, title: str, description: str,
             results: dict[str, tuple[str, int, str]], created: _dt.datetime | None = None,
             version: str = "v4.4.1") -> str:
    """YAML text of a result-group manifest read by *Import Result Group* (schema reconstructed from real
    v4 exports, see docs/cryosparc.md; unverified against v5).

    ``results`` maps slot name -> (metafile, num_items, slot dtype); metafile is written as given
    (use ``'>name.cs'`` for a file beside the ``.csg``).
    """
    created = created or _dt.datetime.now()
    doc = {
        "created": created.replace(tzinfo=None),
        "group": {"description": description, "name": group_name, "title": title, "type": group_type},
        "results": {slot: {"metafile": meta, "num_items": int(n), "type": f"{group_type}.{dtype}"}
                    for slot, (meta, n, dtype) in results.items()},
        "version": version,
    }
    return yaml.safe_dump(doc, sort_keys=False, default_flow_style=False)


def write_group(out_dir: str | os.PathLike, stem: str, dset: Dataset, *, group_name: str, group_type: str,
                title: str, description: str = "") -> tuple[Path, Path]:
    """Write ``<stem>.cs`` and ``<stem>.csg`` (all slots of ``dset`` in the one ``.cs``) into ``out_dir``."""
    out_dir = Path(out_dir)
    cs_path = save_dataset(out_dir / f"{stem}.cs", dset)
    results = {slot: (f">{cs_path.name}", len(dset), slot_dtype(slot)) for slot in dataset_slots(dset)}
    text = csg_text(group_name=group_name, group_type=group_type, title=title, description=description,
                    results=results)
    csg_path = atomic_write_text(out_dir / f"{stem}.csg", text)
    return cs_path, csg_path


def read_csg(path: str | os.PathLike) -> dict:
    """Parse a ``.csg`` manifest (YAML)."""
    return yaml.safe_load(Path(path).read_text())


def dataset_bytes(dset: Dataset) -> bytes:
    buf = io.BytesIO()
    dset.save(buf)
    return buf.getvalue()


__all__ = [
    "CsInputError", "CsParticles", "load_cs", "strip_export_prefix", "resolve_blob_path", "check_box",
    "ctf_from_dataset", "poses_from_dataset", "poses_to_fields", "particles_from_dataset", "has_poses",
    "component_slot", "component_slots", "fill_components", "add_components", "mrc_shape", "fill_volume",
    "volume_dataset", "mask_dataset", "output_name", "save_dataset", "dataset_slots", "slot_dtype", "csg_text", "write_group",
    "read_csg", "unmodelled_ctf_terms",
]
