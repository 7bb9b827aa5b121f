"""Opt-in ``torch.compile`` of small, launch-bound pieces of the training step, with a clean fallback.

On a GPU without tinycudann a training step is bound by kernel launches, not arithmetic: the torch hash
grid's per-level integer work and the CTF's elementwise chain are dozens of tiny kernels each. Compiling
them fuses those kernels; mode ``reduce-overhead`` also replays them as CUDA graphs (re-recorded when a
shape changes, e.g. when an occupancy refresh changes the number of rendered points). Compilation is
only attempted on CUDA tensors: on CPU the eager kernels are not launch-bound and inductor needs a C++
toolchain. Any compile or run failure is logged once and the eager function runs from then on, so an
unusual driver or torch build costs speed, never a job.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch

CompileMode = Literal["default", "reduce-overhead"]


class CompiledFunction:
    """``fn`` through ``torch.compile`` when enabled and called on CUDA tensors; ``fn`` otherwise."""

    def __init__(self, fn: Callable, what: str, graphs_per_fn: int = 8) -> None:
        self.eager, self.what, self.graphs = fn, what, graphs_per_fn
        self.fn: Callable | None = None
        self.mode: CompileMode | None = None
        self.failed: str | None = None
        self.log: Callable[[str], None] = print

    def enable(self, log: Callable[[str], None] = print, mode: CompileMode = "default") -> None:
        """Compile from the next call on (lazily: the first CUDA call compiles)."""
        self.log, self.failed = log, None
        if self.fn is not None and self.mode == mode:
            return
        try:
            import torch._dynamo as dynamo

            # one graph per distinct set of constants (e.g. 16 hash-grid levels): keep them all
            for name in ("recompile_limit", "cache_size_limit"):
                if hasattr(dynamo.config, name):
                    setattr(dynamo.config, name, max(getattr(dynamo.config, name), self.graphs))
            self.fn, self.mode = torch.compile(self.eager, dynamic=True, mode=mode), mode
        except Exception as err:  # noqa: BLE001 - any failure: eager
            self._fail(err)

    def disable(self) -> None:
        self.fn = None

    def _fail(self, err: BaseException) -> None:
        self.fn, self.failed = None, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        self.log(f"torch.compile of {self.what} failed ({self.failed[:200]}); running it eagerly")

    def __call__(self, first: torch.Tensor, *args, **kwargs):
        if self.fn is not None and first.is_cuda:
            try:
                return self.fn(first, *args, **kwargs)
            except Exception as err:  # noqa: BLE001 - any failure: eager from now on
                self._fail(err)
        return self.eager(first, *args, **kwargs)
