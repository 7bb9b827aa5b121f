"""Pieces shared by the live and offline cryoSPARC modes (no server calls, no file formats)."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

from cryoformer.data import ParticleData

from cryoformer_ext.config import JobConfig
from cryoformer_ext.formats.cs import output_name

#: maps of these kinds become cryoSPARC volume outputs; attention maps stay in the job folder only
PUBLISHED_KINDS = ("consensus", "kmeans", "pc", "flexibility")

Engine = Callable[..., Any]


def default_engine() -> Engine:
    """``cryoformer_ext.job.run.run_job``, imported on first use (keeps the adapters importable without torch)."""
    from cryoformer_ext.job.run import run_job

    return run_job


def pose_config(config: JobConfig, data: ParticleData,
                log: Callable[[str], Any] = print) -> tuple[JobConfig, ParticleData]:
    """The config and the particles the engine gets, by :meth:`JobConfig.for_particles`.

    Particles without ``alignments3D`` (an extraction, an import) need the orientation encoder, so
    ``poses`` becomes ``predict``; cryoSPARC job parameters have no "unset" state, so a chosen mode is
    switched with a log line rather than refused. With ``poses=predict`` the input poses are not handed
    to the engine: the returned particles are a copy without them (the input is left as it is).
    """
    chosen = config.for_particles(data.has_poses, explicit=False)
    if not data.has_poses and chosen.poses != config.poses:
        log(f"input particles have no alignments3D (pose/shift): poses={config.poses!r} changed to 'predict' "
            "(the orientation encoder predicts the poses)")
    elif data.has_poses and chosen.poses == "predict":
        log("poses=predict: the input alignments3D are not used for training")
    if chosen.poses == "predict" and data.has_poses:
        data = dataclasses.replace(data, rot=None, shift_px=None)
    return chosen, data


@dataclass(frozen=True)
class PlannedVolume:
    name: str       # map name as the analysis writes it (consensus, class_001, pc1_01, flexibility)
    output: str     # cryoSPARC output group name (volume_<name>)
    title: str


def map_output(name: str) -> str:
    return output_name(name, prefix="volume_")


def planned_volumes(config: JobConfig, n_particles: int) -> list[PlannedVolume]:
    """The maps the analysis is expected to write for this config (live mode declares their outputs
    before the job starts). Follows :func:`cryoformer_ext.analysis.analyze.analyze`: k-means may end with fewer
    classes (identical latents); a map not planned here is added after training instead."""
    out = [PlannedVolume("consensus", map_output("consensus"), "cryoFormer consensus map")]
    if config.zdim > 0 and n_particles >= 1:
        for c in range(min(config.kmeans, n_particles)):
            name = f"class_{c + 1:03d}"
            out.append(PlannedVolume(name, map_output(name), f"cryoFormer k-means class {c + 1}"))
    if config.zdim > 0 and n_particles >= 2 and config.pcs > 0:
        width = max(2, len(str(config.pc_steps)))
        for p in range(1, min(config.pcs, config.zdim, n_particles) + 1):
            for i in range(1, config.pc_steps + 1):
                name = f"pc{p}_{i:0{width}d}"
                out.append(PlannedVolume(name, map_output(name), f"cryoFormer PC{p} map {i}/{config.pc_steps}"))
    if config.zdim > 0 and n_particles >= 2:
        out.append(PlannedVolume("flexibility", map_output("flexibility"),
                                 "cryoFormer flexibility (per-voxel std over particle latents)"))
    return out


def published_maps(maps: Iterable[Any]) -> list[Any]:
    return [m for m in maps if getattr(m, "kind", None) in PUBLISHED_KINDS]


def solvent_mask(maps: Iterable[Any]) -> Any | None:
    """The analysis' soft solvent mask record (kind ``mask``), None when it made none."""
    return next((m for m in maps if getattr(m, "kind", None) == "mask"), None)


def map_title(record: Any) -> str:
    kind = getattr(record, "kind", "")
    if kind == "kmeans" and getattr(record, "index", None) is not None:
        return f"cryoFormer k-means class {record.index + 1}"
    if kind == "pc" and getattr(record, "pc", None) is not None:
        return f"cryoFormer PC{record.pc} map {record.name}"
    return f"cryoFormer {record.name}"


def parse_engine_args(args: Sequence[str]) -> dict[str, str | None]:
    """``['--epochs', '5', '--amp=no', '--flag']`` -> ``{'epochs': '5', 'amp': 'no', 'flag': None}``."""
    out: dict[str, str | None] = {}
    i = 0
    args = list(args)
    while i < len(args):
        a = args[i]
        if not a.startswith("--") or a == "--":
            raise ValueError(f"unexpected argument {a!r} (engine parameters are given as --name value)")
        key = a[2:]
        if "=" in key:
            key, val = key.split("=", 1)
            out[key] = val
            i += 1
            continue
        if i + 1 < len(args) and not re.match(r"^--[A-Za-z]", args[i + 1]):
            out[key] = args[i + 1]
            i += 2
        else:
            out[key] = None
            i += 1
    return out


PROGRESS_RE = re.compile(r"\b(step|batch|iteration) \d+/\d+", re.IGNORECASE)


def is_progress(msg: str) -> bool:
    """Lines that update one progress line in the cryoSPARC event log instead of adding a new one."""
    return bool(PROGRESS_RE.search(msg)) and "done" not in msg
