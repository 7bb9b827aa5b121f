"""Run a benchmark against the project's code at another git ref, side by side with the working tree.

A baseline must be the *other* code, not a flag on the current one: ``git worktree add --detach`` puts the
ref's tree in a temporary folder, and the benchmark's child process runs with that folder first on
``PYTHONPATH`` (the packages are plain folders, so they shadow the editable install).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterator

REPO = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def checkout(ref: str) -> Iterator[Path]:
    """A temporary detached worktree of ``ref``; removed afterwards."""
    sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--verify", f"{ref}^{{commit}}"],
                         capture_output=True, text=True, check=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="cf-baseline-") as tmp:
        tree = Path(tmp) / sha[:12]
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(tree), sha], check=True)
        try:
            yield tree
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=False)


def env_for(code_root: Path | None) -> dict[str, str]:
    """Environment whose ``import cryoformer`` resolves to ``code_root`` (None: this working tree)."""
    env = dict(os.environ)
    root = str(code_root or REPO)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def describe(code_root: Path | None) -> str:
    """``<short sha>`` (+ ``-dirty`` for an uncommitted working tree) of the code a child runs."""
    root = code_root or REPO
    sha = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return sha + ("-dirty" if dirty and code_root is None else "")


def job_setting(name: str) -> Any:
    """``name`` (``model_config_for``, ``select_device``) from the job layer of the code on ``sys.path``:
    ``cryoformer_ext.job.configs`` now, the single ``cryoformer_ext.job`` module before the job layer was
    split into sub-packages (e.g. baseline 21e200b), so one benchmark can measure both."""
    import importlib

    try:
        return getattr(importlib.import_module("cryoformer_ext.job.configs"), name)
    except ImportError:
        return getattr(importlib.import_module("cryoformer_ext.job"), name)
