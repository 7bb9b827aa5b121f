"""ChimeraX command scripts (``.cxc``) that open cryoFormer's maps the way a user looks at them.

ChimeraX runs a ``.cxc`` with the working directory set to the script's folder (ChimeraX
``core/scripting.py: open_command_script``), so every map is referred to by a path relative to the
script and the folder can be moved or copied as a whole. Each script starts with ``close`` (an empty
scene), so the models it opens are numbered #1, #2, ... in the order of its ``open`` commands.

Surface threshold (documented in docs/analysis.md): :data:`LEVEL_FRACTION` of the map's maximum
(taken from the MRC header, which :func:`cryoformer_ext.formats.atomic.write_mrc` fills from the data). One
level serves a whole volume series, :data:`LEVEL_FRACTION` of the smallest maximum in the series, so
that the level lies inside every frame's value range and a frame's surface only changes when the
density does.

Only commands and options registered by ChimeraX itself are used (``open`` with the map format's
``vseries`` option, ``volume``, ``color sample``, ``vseries play``, ``tile``, ``view``, ``close``), and
only built-in palettes (``blue-white-red``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Protocol, Sequence

import mrcfile

from cryoformer_ext.formats.atomic import atomic_write_text

LEVEL_FRACTION = 0.3
FLEX_PALETTE = "blue-white-red"  # rigid (low standard deviation) blue -> flexible red
SUBDIR = "chimerax"


class MapLike(Protocol):
    name: str
    path: Path
    kind: str
    pc: int | None
    index: int | None


def map_range(path: str | os.PathLike) -> tuple[float, float]:
    """(minimum, maximum) of a map from its MRC header (no data read)."""
    with mrcfile.open(path, mode="r", header_only=True, permissive=True) as m:
        return float(m.header.dmin), float(m.header.dmax)


def surface_level(paths: Sequence[str | os.PathLike]) -> float:
    """The surface level of one map or one series: :data:`LEVEL_FRACTION` of the smallest maximum.

    A map whose maximum is not positive (nothing to contour above zero) gets the middle of its range.
    """
    ranges = [map_range(p) for p in paths]
    top = min(hi for _, hi in ranges)
    if top > 0 and all(lo < LEVEL_FRACTION * top for lo, _ in ranges):
        return LEVEL_FRACTION * top
    lo = max(lo for lo, _ in ranges)
    return 0.5 * (lo + top)


def _rel(path: str | os.PathLike, script_dir: Path) -> str:
    rel = Path(os.path.relpath(Path(path).resolve(), script_dir.resolve())).as_posix()
    return f'"{rel}"' if any(c.isspace() for c in rel) else rel


def _num(x: float) -> str:
    return f"{x:.6g}"


def series_script(paths: Sequence[str | os.PathLike], script_dir: Path, title: str) -> str:
    """Open ``paths`` as one volume series (#1) at one level and play it back and forth."""
    level = surface_level(paths)
    files = " ".join(_rel(p, script_dir) for p in paths)
    return "\n".join([
        f"# {title}", f"# surface level {_num(level)} = {LEVEL_FRACTION:g} x the smallest map maximum of the series",
        "close", f"open {files} vseries true", f"volume #1 style surface level {_num(level)}",
        "vseries play #1 loop true direction oscillate", "view", ""])


def side_by_side_script(paths: Sequence[str | os.PathLike], script_dir: Path, title: str) -> str:
    """Open every map as its own model (#1 ... #n), each at its own level, tiled in a grid."""
    lines = [f"# {title}", f"# surface level of each map = {LEVEL_FRACTION:g} x its maximum", "close"]
    lines += [f"open {_rel(p, script_dir)}" for p in paths]
    lines += [f"volume #{i} style surface level {_num(surface_level([p]))}" for i, p in enumerate(paths, start=1)]
    if len(paths) > 1:
        lines.append(f"tile #1-{len(paths)}")
    lines += ["view", ""]
    return "\n".join(lines)


def flexibility_script(consensus: str | os.PathLike, flexibility: str | os.PathLike, script_dir: Path) -> str:
    """The consensus surface (#1) coloured by the flexibility map (#2, hidden) from 0 to its maximum."""
    level = surface_level([consensus])
    fmax = map_range(flexibility)[1]
    return "\n".join([
        "# cryoFormer consensus map coloured by flexibility (per-voxel standard deviation over particle maps):",
        f"# blue = rigid (0) ... red = most flexible ({_num(fmax)}); surface level {_num(level)} = "
        f"{LEVEL_FRACTION:g} x the consensus maximum",
        "close", f"open {_rel(consensus, script_dir)}", f"open {_rel(flexibility, script_dir)}",
        f"volume #1 style surface level {_num(level)}", "volume #2 hide",
        f"color sample #1 map #2 palette {FLEX_PALETTE} range 0,{_num(max(fmax, 1e-12))}", "view", ""])


def write_script(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_text(path, text)


def write_analysis_scripts(out_dir: str | os.PathLike, maps: Iterable[MapLike]) -> list[Path]:
    """``<out_dir>/chimerax/*.cxc`` for an analysis: consensus (coloured by flexibility when there is
    one), each principal-component series, and the k-means maps side by side."""
    out_dir = Path(out_dir)
    sdir = out_dir / SUBDIR
    maps = list(maps)
    by_kind = {k: [m for m in maps if m.kind == k] for k in ("consensus", "flexibility", "kmeans", "pc")}
    written: list[Path] = []
    if by_kind["consensus"]:
        cons = by_kind["consensus"][0].path
        if by_kind["flexibility"]:
            text = flexibility_script(cons, by_kind["flexibility"][0].path, sdir)
            written.append(write_script(sdir / "consensus_flexibility.cxc", text))
        else:
            text = side_by_side_script([cons], sdir, "cryoFormer consensus map")
            written.append(write_script(sdir / "consensus.cxc", text))
    for pc in sorted({m.pc for m in by_kind["pc"] if m.pc is not None}):
        series = sorted((m for m in by_kind["pc"] if m.pc == pc), key=lambda m: m.index or 0)
        text = series_script([m.path for m in series], sdir, f"cryoFormer volume series along PC{pc} "
                                                              "(5th to 95th percentile), played back and forth")
        written.append(write_script(sdir / f"pc{pc}_series.cxc", text))
    if by_kind["kmeans"]:
        km = sorted(by_kind["kmeans"], key=lambda m: m.index or 0)
        text = side_by_side_script([m.path for m in km], sdir, "cryoFormer k-means class maps, class 1 first "
                                                                "(classes numbered along PC1)")
        written.append(write_script(sdir / "kmeans.cxc", text))
    return written
