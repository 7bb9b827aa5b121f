"""``cryoformer simulate``: a simulated heterogeneous dataset with its ground truth, as RELION files."""

from __future__ import annotations

import argparse
from pathlib import Path

from cryoformer_ext.commands import run_guarded
from cryoformer_ext.commands.options import log


def add_parser(subparsers) -> argparse.ArgumentParser:
    s = subparsers.add_parser("simulate", help="write a simulated heterogeneous dataset with ground truth")
    s.add_argument("--out", required=True, type=Path)
    s.add_argument("--n", type=int, default=1000)
    s.add_argument("--box", type=int, default=32)
    s.add_argument("--pixel-size", type=float, default=4.0)
    s.add_argument("--snr", type=float, default=1.0)
    s.add_argument("--states", default="continuous", help="'continuous' or a number of discrete states")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=run)
    return s


def _simulate(args: argparse.Namespace) -> int:
    from cryoformer.simulate import simulate

    from cryoformer_ext.formats.simulation import write_simulated

    states = args.states if args.states == "continuous" else int(args.states)
    sim = simulate(args.n, args.box, pixel_size_A=args.pixel_size, snr=args.snr, states=states, seed=args.seed)
    star = write_simulated(sim, args.out)
    log(f"wrote {args.n} particles to {star} (noise sigma {sim.noise_sigma:.3f})")
    return 0


def run(args: argparse.Namespace) -> int:
    return run_guarded("simulate", lambda: _simulate(args))
