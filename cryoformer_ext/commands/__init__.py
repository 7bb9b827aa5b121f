"""``cryoformer``: one module per subcommand, each with ``add_parser(subparsers)`` and ``run(args)``.

Every command's ``run`` goes through :func:`run_guarded`, so an expected failure is one line on stderr
(``cryoformer <command>: error: ...``, exit status 2), Ctrl-C is exit status 130, and a bug keeps its
traceback, whichever command hit it.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from cryoformer_ext.failures import user_message

COMMANDS = ("train", "simulate", "demo", "analyze", "eval", "select")


def run_guarded(command: str, body: Callable[[], int | None],
                expected: tuple[type[BaseException], ...] = ()) -> int:
    """Run one command; ``expected`` are the command's own error types whose text is already the message."""
    try:
        return int(body() or 0)
    except KeyboardInterrupt:
        print(f"cryoformer {command}: interrupted; the last finished epoch's checkpoint is kept: run the same "
              "command again to continue from it", file=sys.stderr, flush=True)
        return 130
    except Exception as err:  # noqa: BLE001 - one clear line for what a user can fix
        message = str(err) if isinstance(err, expected) else user_message(err)
        if message is None and isinstance(err, (ValueError, RuntimeError)):
            message = str(err)
        if message is None:  # a bug: keep the traceback
            raise
        print(f"cryoformer {command}: error: {message}", file=sys.stderr, flush=True)
        return 2


def build_parser() -> argparse.ArgumentParser:
    import importlib

    p = argparse.ArgumentParser(prog="cryoformer", description="train on a particle STAR file, simulate data, "
                                "run the demo, re-analyse a job, decode maps, select particles")
    sub = p.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").add_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
