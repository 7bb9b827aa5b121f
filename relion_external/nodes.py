"""RELION's side of the External-job protocol: version detection, exit files, output nodes.

Facts (see docs/relion.md and the research notes): RELION writes ``<--o>/job.star`` before it starts
the program; the program writes exactly one of the exit files and optionally
``RELION_OUTPUT_NODES.star``, and polls ``RELION_JOB_ABORT_NOW``. RELION (3.1, 4.0, 5.0) deletes the
exit files and ``RELION_JOB_ABORT_NOW`` just before it launches a job, so the program never deletes an
abort request: one that exists at start-up was made after the launch. RELION 3.1 reads the integer node
type ``_rlnPipeLineNodeType``; 4.0 and 5.0 read the string ``_rlnPipeLineNodeTypeLabel`` (different
strings for particles in 4.0 and 5.0). Writing both columns works in 3.1 (it warns and ignores the
label column) and in 4.0/5.0 (the int column is not read).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

from cryoformer_ext.formats.atomic import atomic_write_text, touch

EXIT_SUCCESS = "RELION_JOB_EXIT_SUCCESS"
EXIT_FAILURE = "RELION_JOB_EXIT_FAILURE"
EXIT_ABORTED = "RELION_JOB_EXIT_ABORTED"
ABORT_NOW = "RELION_JOB_ABORT_NOW"
OUTPUT_NODES = "RELION_OUTPUT_NODES.star"

RelionVersion = Literal["3.1", "4.0", "5.0"]

# node kind -> (3.1 int code, 4.0 label, 5.0 label)
NODE_TYPES: dict[str, tuple[int, str, str]] = {
    "particles": (3, "ParticlesData.star.relion", "ParticleGroupMetadata.star.relion"),
    "map": (6, "DensityMap.mrc", "DensityMap.mrc"),
    "mask": (7, "Mask3D.mrc", "Mask3D.mrc"),
    "halfmap": (10, "DensityMap.mrc.halfmap", "DensityMap.mrc.halfmap"),
    "pdf": (13, "LogFile.pdf.relion", "LogFile.pdf.relion"),
}


def detect_version(out_dir: str | os.PathLike) -> RelionVersion | None:
    """RELION version that started the job, from ``<out_dir>/job.star``; None when there is none."""
    job = Path(out_dir) / "job.star"
    try:
        text = job.read_text(errors="replace")
    except OSError:
        return None
    m = re.search(r"^#\s*version\s+(\d+)", text, flags=re.MULTILINE)
    version = int(m.group(1)) if m else None
    if version is not None and version >= 50000:
        return "5.0"
    if re.search(r"_rlnJobTypeLabel\b", text):
        return "4.0"
    if re.search(r"_rlnJobType\b", text):
        return "3.1"
    return None


def node_type(kind: str, version: RelionVersion | None) -> tuple[int, str]:
    code, l4, l5 = NODE_TYPES[kind]
    return code, (l5 if version == "5.0" else l4)


def write_output_nodes(out_dir: str | os.PathLike, nodes: list[tuple[str, str]],
                       version: RelionVersion | None) -> Path:
    """Write ``RELION_OUTPUT_NODES.star`` with both the int and the label type column.

    ``nodes`` are (name relative to the project directory, kind in :data:`NODE_TYPES`).
    """
    lines = ["", "# version 50001" if version == "5.0" else "# version 30001", "", "data_output_nodes", "",
             "loop_", "_rlnPipeLineNodeName #1", "_rlnPipeLineNodeType #2", "_rlnPipeLineNodeTypeLabel #3"]
    for name, kind in nodes:
        if any(c.isspace() for c in name):
            raise ValueError(f"RELION node names cannot contain spaces: {name!r}")
        code, label = node_type(kind, version)
        lines.append(f"{name} {code} {label}")
    return atomic_write_text(Path(out_dir) / OUTPUT_NODES, "\n".join(lines) + "\n\n")


def clear_exit_files(out_dir: str | os.PathLike) -> list[str]:
    """Remove exit files of an earlier run (a run by hand; RELION removes them itself); return what was removed.

    ``RELION_JOB_ABORT_NOW`` is left alone: it is the user's request, see the module docstring.
    """
    return _remove(out_dir, [EXIT_SUCCESS, EXIT_FAILURE, EXIT_ABORTED])


def clear_previous_outputs(out_dir: str | os.PathLike, names: list[str]) -> list[str]:
    """Remove the node file and ``names`` of an earlier run, so that a Continue that fails or is aborted
    leaves nothing beside its exit file that could be taken for its own results."""
    return _remove(out_dir, [OUTPUT_NODES, *names])


def _remove(out_dir: str | os.PathLike, names: list[str]) -> list[str]:
    removed = []
    for name in names:
        p = Path(out_dir) / name
        if p.exists():
            p.unlink()
            removed.append(name)
    return removed


def write_exit(out_dir: str | os.PathLike, which: str) -> Path:
    if which not in (EXIT_SUCCESS, EXIT_FAILURE, EXIT_ABORTED):
        raise ValueError(which)
    return touch(Path(out_dir) / which)


def abort_requested(out_dir: str | os.PathLike) -> bool:
    return (Path(out_dir) / ABORT_NOW).exists()
