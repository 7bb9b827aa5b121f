"""The job parameters as command-line options (the same names as the RELION label/value fields)."""

from __future__ import annotations

import argparse
import time

from cryoformer_ext.config import JobConfig


def add_job_options(p: argparse.ArgumentParser, defaults: dict | None = None) -> None:
    g = p.add_argument_group("job parameters (same names as the RELION label/value fields)")
    for name, field in JobConfig.model_fields.items():
        default = (defaults or {}).get(name, field.default)
        g.add_argument(f"--{name}", dest=f"job_{name}", default=None, metavar="V",
                       help=f"{field.description} (default: {default})")


def job_config(args: argparse.Namespace, defaults: dict | None = None) -> JobConfig:
    """Options given on the command line win over ``defaults`` (the command's own, e.g. the demo's)."""
    values = {k: str(v) for k, v in (defaults or {}).items()}
    values.update({k[4:]: v for k, v in vars(args).items() if k.startswith("job_") and v is not None})
    return JobConfig.from_strings(values, source="command line")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)
