"""A checker for the subset of ChimeraX commands that cryoFormer's ``.cxc`` scripts use.

ChimeraX itself is not installable from a package registry here (PyPI's only ``ChimeraX`` wheel, 0.1.71,
is yanked: "Import chimerax broken"; Debian has no package), so the scripts are checked against
ChimeraX's own command registrations, transcribed from its source (RBVI/ChimeraX):

* ``open``: ``open_command/src/cmd.py`` (built-in keywords) + the map formats' ``open_args``
  (``map/src/__init__.py``: ``arrayName``, ``channel``, ``verbose``, ``vseries``, ``difference``);
  scripts run with the working directory set to the script's folder (``core/src/scripting.py``);
* ``volume``: ``map/src/volumecommand.py`` (only the keywords cryoFormer uses are accepted here);
* ``color sample``: ``surface/src/colorcmds.py`` (``map`` required; ``palette`` = ``ColormapArg``,
  ``range`` = two floats or ``full``); built-in palette names from ``core/src/colors.py``;
* ``vseries play``: ``map_series/src/vseries_command.py``;
* ``tile``: ``std_commands/src/tile.py``; ``close`` and ``view``: ``std_commands``.

Beyond syntax it checks what ChimeraX would only find out when run: files exist (relative to the
script), model specs refer to models opened earlier, ``color sample``'s map is one map, ``vseries play``
gets a series, every surface level lies strictly inside the value range of each map it applies to (read
from the map data, not the header), and a colouring range overlaps the colouring map's values.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import mrcfile
import numpy as np


class CxcError(AssertionError):
    pass


BUILTIN_PALETTES = {"rainbow", "grayscale", "gray", "red-white-blue", "redblue", "blue-white-red", "bluered",
                    "cyan-white-maroon", "cyanmaroon", "cyan-gray-maroon", "lipophilicity", "alphafold", "esmfold",
                    "pae", "paegreen", "paecontacts"}
OPEN_KEYWORDS = {"format", "fromDatabase", "id", "ignoreCache", "name", "center",  # open_command/src/cmd.py
                 "arrayName", "channel", "verbose", "vseries", "difference"}          # map format open_args


@dataclass
class Model:
    id: int
    files: list[Path]
    series: bool
    ranges: list[tuple[float, float]] = field(default_factory=list)


@dataclass
class Script:
    path: Path
    models: dict[int, Model] = field(default_factory=dict)
    commands: list[str] = field(default_factory=list)
    levels: dict[int, float] = field(default_factory=dict)


def _bool(v: str, where: str) -> bool:
    t = v.casefold()
    if t in ("0", "off") or (t and "false".startswith(t)):
        return False
    if t in ("1", "on") or (t and "true".startswith(t)):
        return True
    raise CxcError(f"{where}: {v!r} is not true/false")


def _float(v: str, where: str) -> float:
    try:
        x = float(v)
    except ValueError:
        raise CxcError(f"{where}: {v!r} is not a number") from None
    if not np.isfinite(x):
        raise CxcError(f"{where}: {v!r} is not finite")
    return x


def _int(v: str, where: str) -> int:
    if not re.fullmatch(r"-?\d+", v):
        raise CxcError(f"{where}: {v!r} is not an integer")
    return int(v)


def _keywords(tokens: list[str], allowed: dict, where: str) -> dict[str, str | None]:
    """``key value`` pairs as registered (camelCase). ``allowed[key]`` is "value", "noarg" (no value) or
    "repeat" (may occur several times: the values are joined with spaces and checked one by one)."""
    out: dict[str, str | None] = {}
    i = 0
    while i < len(tokens):
        key = tokens[i]
        if key not in allowed:
            raise CxcError(f"{where}: unknown or unsupported keyword {key!r} (allowed: {', '.join(sorted(allowed))})")
        if key in out and allowed[key] != "repeat":
            raise CxcError(f"{where}: keyword {key!r} given twice")
        if allowed[key] == "noarg":
            out[key] = None
            i += 1
            continue
        if i + 1 >= len(tokens):
            raise CxcError(f"{where}: keyword {key!r} needs a value")
        out[key] = tokens[i + 1] if key not in out else f"{out[key]} {tokens[i + 1]}"
        i += 2
    return out


class Checker:
    def __init__(self, path: Path):
        self.s = Script(path=Path(path))

    def _spec(self, spec: str, where: str) -> list[Model]:
        m = re.fullmatch(r"#(\d+(?:-\d+)?(?:,\d+(?:-\d+)?)*)", spec)
        if not m:
            raise CxcError(f"{where}: {spec!r} is not a model spec such as #1, #1-3 or #1,4")
        ids: list[int] = []
        for part in m.group(1).split(","):
            lo, _, hi = part.partition("-")
            a, b = int(lo), int(hi or lo)
            if b < a:
                raise CxcError(f"{where}: model range {part} runs backwards")
            ids.extend(range(a, b + 1))
        missing = [i for i in ids if i not in self.s.models]
        if missing:
            raise CxcError(f"{where}: model #{missing[0]} is not open (open: {sorted(self.s.models)})")
        return [self.s.models[i] for i in ids]

    def run_line(self, no: int, line: str) -> None:
        where = f"{self.s.path.name}:{no}"
        if ";" in line:
            raise CxcError(f"{where}: several commands on one line are not used by cryoFormer")
        try:
            tok = shlex.split(line)
        except ValueError as err:
            raise CxcError(f"{where}: {err}") from None
        self.s.commands.append(tok[0])
        name = tok[0]
        if name == "close":
            self._close(tok[1:], where)
        elif name == "open":
            self._open(tok[1:], where)
        elif name == "volume":
            self._volume(tok[1:], where)
        elif name == "color" and tok[1:2] == ["sample"]:
            self._color_sample(tok[2:], where)
        elif name == "vseries" and tok[1:2] == ["play"]:
            self._vseries_play(tok[2:], where)
        elif name == "tile":
            self._tile(tok[1:], where)
        elif name == "view":
            if len(tok) > 2 or (len(tok) == 2 and not self._spec(tok[1], where)):
                raise CxcError(f"{where}: view takes at most a model spec")
        else:
            raise CxcError(f"{where}: command {' '.join(tok[:2])!r} is not in the checked subset")

    def _close(self, args: list[str], where: str) -> None:
        if not args:
            self.s.models.clear()
            return
        if len(args) != 1:
            raise CxcError(f"{where}: close takes one model spec")
        for m in self._spec(args[0], where):
            del self.s.models[m.id]

    def _open(self, args: list[str], where: str) -> None:
        files = []
        while args and args[0] not in OPEN_KEYWORDS:
            files.append(args.pop(0))
        if not files:
            raise CxcError(f"{where}: open needs file names")
        kw = _keywords(args, {k: "value" for k in OPEN_KEYWORDS}, where)
        unsupported = set(kw) - {"vseries"}
        if unsupported:
            raise CxcError(f"{where}: open keyword(s) {sorted(unsupported)} are valid ChimeraX but not checked here")
        series = _bool(kw["vseries"], where) if "vseries" in kw else False
        paths = []
        for f in files:
            p = self.s.path.parent / f  # ChimeraX runs a .cxc from the script's folder
            if not p.is_file():
                raise CxcError(f"{where}: file {f} does not exist (relative to {self.s.path.parent})")
            with mrcfile.open(p, permissive=True) as mrc:
                data = np.asarray(mrc.data)
                if data.ndim != 3:
                    raise CxcError(f"{where}: {f} is not a 3D map (shape {data.shape})")
                paths.append((p, (float(data.min()), float(data.max()))))
        groups = [paths] if series else [[p] for p in paths]
        for g in groups:
            new_id = 1
            while new_id in self.s.models:  # ChimeraX gives the lowest free top-level id
                new_id += 1
            self.s.models[new_id] = Model(new_id, [p for p, _ in g], series and len(g) > 0, [r for _, r in g])

    def _volume(self, args: list[str], where: str) -> None:
        if not args or not args[0].startswith("#"):
            raise CxcError(f"{where}: volume needs a model spec first (cryoFormer never changes all maps)")
        models = self._spec(args[0], where)
        kw = _keywords(args[1:], {"style": "value", "level": "repeat", "show": "noarg", "hide": "noarg",
                                   "transparency": "value", "step": "value"}, where)
        if "style" in kw and kw["style"] not in ("surface", "mesh", "image", "solid"):
            raise CxcError(f"{where}: style {kw['style']!r} is not surface/mesh/image/solid")
        if "show" in kw and "hide" in kw:
            raise CxcError(f"{where}: show and hide together")
        if "transparency" in kw and not 0 <= _float(kw["transparency"], where) <= 1:
            raise CxcError(f"{where}: transparency must be 0..1")
        if "step" in kw and _int(kw["step"], where) < 1:
            raise CxcError(f"{where}: step must be >= 1")
        for value in (kw.get("level") or "").split():  # a surface level (image-style "level,brightness" unused)
            level = _float(value, where)
            for m in models:
                for f, (lo, hi) in zip(m.files, m.ranges):
                    if not lo < level < hi:
                        raise CxcError(f"{where}: level {level:g} is outside the value range "
                                       f"[{lo:g}, {hi:g}] of {f.name}: the surface would be empty or the whole box")
                self.s.levels[m.id] = level

    def _color_sample(self, args: list[str], where: str) -> None:
        if not args:
            raise CxcError(f"{where}: color sample needs surfaces")
        self._spec(args[0], where)
        kw = _keywords(args[1:], {"map": "value", "palette": "value", "range": "value", "transparency": "value",
                                   "key": "value", "outsideColor": "value", "offset": "value", "update": "value"},
                       where)
        if "map" not in kw:
            raise CxcError(f"{where}: color sample requires 'map'")
        maps = self._spec(kw["map"], where)
        if len(maps) != 1 or maps[0].series:
            raise CxcError(f"{where}: color sample's map must be one map")
        if "palette" in kw:
            pal = kw["palette"].lstrip("^").casefold()
            if ":" not in pal and pal not in BUILTIN_PALETTES:
                raise CxcError(f"{where}: palette {kw['palette']!r} is not a ChimeraX built-in palette "
                               "(ChimeraX would try to fetch it from the web)")
        if "range" in kw and kw["range"] != "full":
            parts = kw["range"].split(",")
            if len(parts) != 2:
                raise CxcError(f"{where}: range must be low,high or full")
            lo, hi = (_float(p, where) for p in parts)
            mlo, mhi = maps[0].ranges[0]
            if not lo < hi:
                raise CxcError(f"{where}: range {lo:g},{hi:g} is empty")
            if hi <= mlo or lo >= mhi:
                raise CxcError(f"{where}: range {lo:g},{hi:g} misses the map's values [{mlo:g}, {mhi:g}]")
        for key in ("key", "update"):
            if key in kw:
                _bool(kw[key], where)

    def _vseries_play(self, args: list[str], where: str) -> None:
        if not args:
            raise CxcError(f"{where}: vseries play needs a series")
        models = self._spec(args[0], where)
        if not all(m.series for m in models):
            raise CxcError(f"{where}: {args[0]} is not a volume series (open ... vseries true)")
        kw = _keywords(args[1:], {"loop": "value", "direction": "value", "normalize": "value",
                                   "maxFrameRate": "value", "pauseFrames": "value", "jumpTo": "value",
                                   "startTime": "value", "cacheFrames": "value"}, where)
        if "direction" in kw and kw["direction"] not in ("forward", "backward", "oscillate"):
            raise CxcError(f"{where}: direction {kw['direction']!r} is not forward/backward/oscillate")
        for key in ("loop", "normalize"):
            if key in kw:
                _bool(kw[key], where)
        if "maxFrameRate" in kw:
            _float(kw["maxFrameRate"], where)
        for key in ("pauseFrames", "jumpTo", "startTime", "cacheFrames"):
            if key in kw:
                _int(kw[key], where)

    def _tile(self, args: list[str], where: str) -> None:
        if args and args[0].startswith("#"):
            self._spec(args.pop(0), where)
        kw = _keywords(args, {"columns": "value", "spacingFactor": "value", "viewAll": "value",
                              "independentRotation": "value"}, where)
        if "columns" in kw and _int(kw["columns"], where) < 1:
            raise CxcError(f"{where}: columns must be >= 1")
        if "spacingFactor" in kw:
            _float(kw["spacingFactor"], where)
        for key in ("viewAll", "independentRotation"):
            if key in kw:
                _bool(kw[key], where)


def check_script(path: str | Path) -> Script:
    """Check every command of a ``.cxc``; raises :class:`CxcError` naming the file, line and problem."""
    path = Path(path)
    checker = Checker(path)
    for no, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        checker.run_line(no, line)
    if not checker.s.commands:
        raise CxcError(f"{path}: no commands")
    return checker.s
