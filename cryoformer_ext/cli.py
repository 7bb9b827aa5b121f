"""``cryoformer``: train on a particle STAR file, simulate data, run the demo, re-analyse a job."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence


from . import analyze_cli
from . import eval_cli, select_cli  # explore a finished job: maps at chosen latents, particle subsets
from .config import JobConfig
from .failures import user_message


def _add_job_options(p: argparse.ArgumentParser, defaults: dict | None = None) -> None:
    g = p.add_argument_group("job parameters (same names as the RELION label/value fields)")
    for name, field in JobConfig.model_fields.items():
        default = (defaults or {}).get(name, field.default)
        g.add_argument(f"--{name}", dest=f"job_{name}", default=None, metavar="V",
                       help=f"{field.description} (default: {default})")


def _job_config(args: argparse.Namespace, defaults: dict | None = None) -> JobConfig:
    values = {k: str(v) for k, v in (defaults or {}).items()}
    values.update({k[4:]: v for k, v in vars(args).items() if k.startswith("job_") and v is not None})
    return JobConfig.from_strings(values, source="command line")


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cmd_train(args: argparse.Namespace) -> int:
    from .job import run_job
    from .star_io import read_particles_star

    star = read_particles_star(args.particles, args.project_dir, require_ctf=_job_config(args).ctf)
    cfg = _job_config(args, {} if star.data.has_poses else {"poses": "predict"})
    _log(f"read {star.record.n_particles} particles from {args.particles} (box {star.data.box}, "
         f"{star.data.pixel_size_A:.3f} A/px, poses {'given' if star.data.has_poses else 'absent'})")
    result = run_job(star.data, cfg, args.out, log=_log)
    if result is None:  # rank > 0 under torchrun: rank 0 writes the outputs
        return 0
    extra = star.predicted_pose_columns(result.predicted_poses)
    out = star.write(Path(args.out) / "particles.star", latents=result.latents, labels=result.labels, extra=extra)
    _log(f"wrote {out}" + (" with the predicted orientations" if extra else "")
         + f", {len(result.maps)} maps, summary {result.summary_file}")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from cryoformer.simulate import simulate

    from .simulation_io import write_simulated

    states = args.states if args.states == "continuous" else int(args.states)
    sim = simulate(args.n, args.box, pixel_size_A=args.pixel_size, snr=args.snr, states=states, seed=args.seed)
    star = write_simulated(sim, args.out)
    _log(f"wrote {args.n} particles to {star} (noise sigma {sim.noise_sigma:.3f})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    cfg = _job_config(args, DEMO_DEFAULTS)
    run_demo(Path(args.out), n=args.n, box=args.box, snr=args.snr, seed=cfg.seed, overrides=cfg, log=_log)
    return 0  # the recovery table is a report, not a pass/fail verdict


DEMO_DEFAULTS = {"epochs": 14, "kmeans": 5, "pcs": 2, "pc_steps": 6, "batch_size": 8}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cryoformer", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train on a RELION particle STAR file and write latents, maps, particles.star")
    t.add_argument("--particles", required=True, type=Path, help="particle STAR file (RELION 3.0-5.0)")
    t.add_argument("--out", required=True, type=Path, help="output folder (rerun to continue)")
    t.add_argument("--project-dir", type=Path, default=None, help="folder image names are relative to (default: cwd)")
    _add_job_options(t)
    t.set_defaults(func=cmd_train)

    s = sub.add_parser("simulate", help="write a simulated heterogeneous dataset with ground truth")
    s.add_argument("--out", required=True, type=Path)
    s.add_argument("--n", type=int, default=1000)
    s.add_argument("--box", type=int, default=32)
    s.add_argument("--pixel-size", type=float, default=4.0)
    s.add_argument("--snr", type=float, default=1.0)
    s.add_argument("--states", default="continuous", help="'continuous' or a number of discrete states")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_simulate)

    d = sub.add_parser("demo", help="simulate a small heterogeneous dataset and reconstruct it end to end")
    d.add_argument("--out", type=Path, default=Path("demo_out"))
    d.add_argument("--n", type=int, default=1500, help="particles")
    d.add_argument("--box", type=int, default=24)
    d.add_argument("--snr", type=float, default=1.0)
    _add_job_options(d, DEMO_DEFAULTS)
    d.set_defaults(func=cmd_demo)

    analyze_cli.add_parser(sub)
    eval_cli.add_parser(sub)
    select_cli.add_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"cryoformer {args.command}: interrupted; the last finished epoch's checkpoint is kept: run the same "
              "command again to continue from it", file=sys.stderr, flush=True)
        return 130
    except Exception as err:  # noqa: BLE001 - one clear line for what a user can fix
        message = user_message(err)
        if message is None and isinstance(err, (ValueError, RuntimeError)):
            message = str(err)
        if message is None:  # a bug: keep the traceback
            raise
        print(f"cryoformer {args.command}: error: {message}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
