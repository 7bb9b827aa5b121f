"""Compile the CPU kernels once per machine and load them with ctypes.

Why C at all: on one CPU core a training step was mostly many small memory-bound torch operations, not
arithmetic: between the point head's matrix products (which torch runs at GEMM speed) its softmax, ReLU
and their backward, the hash grid's thirty kernels per level, the renderer's choice of lattice points
and its sampling, the point query's normalisation. ``point_density.c``, ``hash_grid.c``, ``project.c``
and ``layer_norm.c`` do each of those as one loop. Why not a torch extension: building one takes a
minute and ninja; these are small C files that any C compiler builds in a second, with no torch headers.
Where no compiler is found or the build fails, :func:`library` returns None and the torch forms run,
which compute the same functions.

The library is built for this CPU (``-march=native``) into a cache folder
(``CRYOFORMER_NATIVE_DIR``, else ``~/.cache/cryoformer``) under a name that hashes the source, the flags
and the CPU's features, so a home folder shared by unlike machines holds one build per kind of CPU.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sysconfig
import tempfile
from functools import lru_cache
from pathlib import Path

SOURCES = [Path(__file__).with_name(name)
           for name in ("point_density.c", "hash_grid.c", "project.c", "layer_norm.c")]
HEADER = Path(__file__).with_name("threads.h")
# no contraction into fused multiply-adds anywhere: the hash grid's positions and weights are rounded as in
# its torch form (and tcnn's), bit for bit
FLAGS = ["-O3", "-march=native", "-fPIC", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off"]
# the head's sums may be reassociated (vectorised): their order is not part of any reference
FAST_SUMS = {name: ["-fassociative-math", "-fno-signed-zeros", "-ffinite-math-only"]
             for name in ("point_density.c", "layer_norm.c")}
# ctypes signatures: p = pointer, l = long, f = float, i = int
_SIGNATURES = {"softmax_fwd": "pplppllll", "softmax_again": "ppplpllll", "density_fwd": "plppfpllll",
               "density_bwd": "plppplppplll", "softmax_bwd": "pplplll"}
_HASH_SIGNATURE = "plpppppliplppp"
_CTYPES = {"p": ctypes.c_void_p, "l": ctypes.c_long, "f": ctypes.c_float, "i": ctypes.c_int}


def _switched_off() -> bool:
    return os.environ.get("CRYOFORMER_NATIVE", "1") == "0"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), sysconfig.get_config_var("CC"), "cc", "gcc", "clang"):
        if name:
            path = shutil.which(name.split()[0])
            if path:
                return path
    return None


def _cpu_key() -> str:
    """What -march=native depends on: the CPU's model and feature flags (Linux), else the platform."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("flags", "model name"))][:2]
        return "\n".join(lines)
    except OSError:
        return platform.processor() + platform.machine()


def _cache_dir() -> Path:
    if os.environ.get("CRYOFORMER_NATIVE_DIR"):
        return Path(os.environ["CRYOFORMER_NATIVE_DIR"])
    try:
        return Path.home() / ".cache" / "cryoformer"
    except RuntimeError:  # no home folder (a batch node without HOME)
        return Path(tempfile.gettempdir()) / "cryoformer"


def _build(cc: str, target: Path) -> None:
    """Compile to a temporary name, then rename: concurrent processes never load a half-written file.
    With OpenMP where the compiler has it, else without (the loops then run on one thread)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as work:
        tmp = Path(work) / target.name
        for openmp in (["-fopenmp"], []):
            try:
                objects = []
                for src in SOURCES:
                    objects.append(Path(work) / (src.stem + ".o"))
                    subprocess.run([cc, *FLAGS, *FAST_SUMS.get(src.name, []), *openmp, "-c", str(src), "-o",
                                    str(objects[-1])], check=True, capture_output=True, timeout=120)
                subprocess.run([cc, "-shared", *openmp, *map(str, objects), "-o", str(tmp), "-lm"], check=True,
                               capture_output=True, timeout=120)
                break
            except subprocess.CalledProcessError:
                if not openmp:
                    raise
        os.replace(tmp, target)


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    typed = {f"{name}_{suffix}": sig for name, sig in _SIGNATURES.items() for suffix in ("f32", "bf16")}
    typed.update(hash_grid_fwd=_HASH_SIGNATURE, hash_grid_bwd=_HASH_SIGNATURE, reach_pack="pplplppllppp",
                 project_fwd="plplpplplp", project_bwd="plplpplplp", set_threads="i",
                 scaled_norm_fwd="ppllppffppp", scaled_norm_bwd="ppppllppfppppp")
    for name, sig in typed.items():
        fn = getattr(lib, name)
        fn.argtypes = [_CTYPES[c] for c in sig]
        fn.restype = None
    return lib


@lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The compiled passes, or None (no compiler, a failed build, or ``CRYOFORMER_NATIVE=0``)."""
    if _switched_off():
        return None
    cc = _compiler()
    if cc is None:
        return None
    text = (b"".join(src.read_bytes() for src in (*SOURCES, HEADER)) + repr((FLAGS, FAST_SUMS)).encode()
            + _cpu_key().encode())
    name = f"kernels-{hashlib.sha256(text).hexdigest()[:16]}.so"
    # a home folder that cannot be written (a read-only or full one on a cluster): the system's temporary folder
    user = getattr(os, "getuid", lambda: 0)()
    for folder in (_cache_dir(), Path(tempfile.gettempdir()) / f"cryoformer-{user}"):
        target = folder / name
        try:
            if not target.exists():
                _build(cc, target)
            return _bind(ctypes.CDLL(str(target)))
        except (OSError, subprocess.SubprocessError, AttributeError):
            continue
    return None


def note() -> str:
    """For the training log: which form the CPU kernels run in, and why not C."""
    if library() is not None:
        return "CPU kernels in C"
    if _switched_off():
        return "CPU kernels in torch (CRYOFORMER_NATIVE=0)"
    return "CPU kernels in torch (" + ("the C build failed" if _compiler() else "no C compiler found") + ")"


def kernels() -> ctypes.CDLL | None:
    """:func:`library`, with its parallel loops set to torch's thread count (``torch.set_num_threads``, the
    job's ``--j``/``threads``) for the calls that follow."""
    lib = library()
    if lib is not None:
        import torch

        lib.set_threads(torch.get_num_threads())
    return lib
