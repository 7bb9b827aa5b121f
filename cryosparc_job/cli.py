"""``cryoformer-cryosparc``: run cryoFormer on cryoSPARC particles, live (external job) or offline.

Live::

    cryoformer-cryosparc --project P12 --workspace W1 --particles J24.particles [--epochs 20 --zdim 8 ...]

Offline (no server; writes .cs/.csg/.mrc for Import Result Group)::

    cryoformer-cryosparc --offline --particles-cs J24_particles.cs --project-dir /data/P12 --out results/ [...]

Any other ``--name value`` is a cryoFormer parameter (``--help-params`` lists them).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from cryoformer_ext.config import JobConfig, JobConfigError
from cryoformer_ext.formats.cs import CsInputError

from .common import parse_engine_args

PROG = "cryoformer-cryosparc"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, allow_abbrev=False,
        description="cryoFormer heterogeneous reconstruction for cryoSPARC particles. Extra --name value "
                    "arguments are cryoFormer parameters (see --help-params).")
    live = p.add_argument_group("live mode (creates an external job through cryosparc-tools)")
    live.add_argument("--project", help="project uid, e.g. P12")
    live.add_argument("--workspace", help="workspace uid, e.g. W1")
    live.add_argument("--particles", help="source particles as <job>.<output>, e.g. J24.particles")
    live.add_argument("--title", default="cryoFormer", help="title of the new job")
    live.add_argument("--base-url", help="cryoSPARC URL (default: $CRYOSPARC_BASE_URL)")
    live.add_argument("--email", help="cryoSPARC login e-mail (default: $CRYOSPARC_EMAIL; the password is "
                                      "read from $CRYOSPARC_PASSWORD, else a saved `cryosparc.tools login`)")
    live.add_argument("--work-dir", type=Path,
                      help="local folder for the engine when the job folder is not reachable from this machine")
    off = p.add_argument_group("offline mode (no server)")
    off.add_argument("--offline", action="store_true", help="read a .cs file and write importable results")
    off.add_argument("--particles-cs", type=Path, help="particles .cs file (e.g. exported J24_particles.cs)")
    off.add_argument("--out", type=Path, help="output folder (.cs, .csg, maps)")
    p.add_argument("--project-dir", type=Path,
                   help="the cryoSPARC project directory as seen from this machine (blob/path is relative to it); "
                        "offline: required; live: default is the server's project path")
    p.add_argument("--help-params", action="store_true", help="list the cryoFormer parameters and exit")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.help_params:
        print("cryoFormer parameters (--name value):\n" + JobConfig.help_table())
        return 0
    try:
        config = JobConfig.from_strings(parse_engine_args(rest), source="command line")
    except (ValueError, JobConfigError) as err:
        parser.error(str(err))

    if args.offline:
        missing = [n for n, v in (("--particles-cs", args.particles_cs), ("--project-dir", args.project_dir),
                                  ("--out", args.out)) if v is None]
        if missing:
            parser.error("--offline needs " + ", ".join(missing))
        from .offline import run_offline

        try:
            res = run_offline(args.particles_cs, args.project_dir, args.out, config)
        except (CsInputError, JobConfigError) as err:
            print(f"{PROG}: error: {err}", file=sys.stderr)
            return 1
        except Exception as err:  # noqa: BLE001 - report, do not dump a traceback on users
            print(f"{PROG}: error: {type(err).__name__}: {err}", file=sys.stderr)
            return 1
        print(f"done: {res.particles_csg or '(no particles group: zdim 0)'} and {len(res.volumes)} volume groups "
              f"in {args.out}; import them with cryoSPARC's Import Result Group")
        return 0

    missing = [n for n, v in (("--project", args.project), ("--workspace", args.workspace),
                              ("--particles", args.particles)) if not v]
    if missing:
        parser.error("live mode needs " + ", ".join(missing) + " (or use --offline)")
    from .live import LiveError, LiveSettings, run_live

    settings = LiveSettings(project=args.project, workspace=args.workspace, particles=args.particles,
                            title=args.title, project_dir=args.project_dir, work_dir=args.work_dir,
                            base_url=args.base_url, email=args.email)
    try:
        uid = run_live(settings, config)
    except LiveError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    print(f"done: {args.project} {uid}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
