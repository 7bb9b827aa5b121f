"""``cryoformer-relion``: cryoFormer as a RELION 3.1 / 4.0 / 5.0 External job.

RELION runs, with the project directory as the working directory::

    cryoformer-relion --o External/job012/ --in_parts Refine3D/job011/run_data.star [--in_3dref F]
        [--in_mask F] [--<label> <value> ...] --j <threads> [<other args>] [--pipeline_control DIR]

and appends stdout to ``run.out`` and stderr to ``run.err``. Values are not quoted by RELION, so a value
with spaces arrives as several argv items (joined again here) and an empty value as a bare ``--label``.
The job writes ``particles.star`` (the input particles with every original column, ``rlnCryoformerZ1..K``
latent coordinates and ``rlnClassNumber`` = k-means class), the maps, ``RELION_OUTPUT_NODES.star`` and
exactly one of ``RELION_JOB_EXIT_SUCCESS`` / ``_FAILURE`` / ``_ABORTED``, whatever happens (a full disk
included). Running it again with the same ``--o`` continues from the last checkpoint. RELION 4.0 and 5.0
append the Running tab's "additional arguments" right after ``--j N``; RELION deletes
``RELION_JOB_ABORT_NOW`` itself before it launches a job, so one found at start-up is a request made
while the job waited (e.g. in a queue) and ends the job as aborted at once.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from cryoformer_ext.config import JobConfig
from cryoformer_ext.failures import os_error_message, user_message
from cryoformer_ext.jobdir import PARTICLES_FILE

from . import nodes as _nodes
from .usage import UsageError

if TYPE_CHECKING:  # the job layer imports torch: only when a job runs, so that --help stays fast
    from cryoformer_ext.formats.star import ParticleStar
    from cryoformer_ext.job.run import JobResult

# options RELION itself passes (see docs/relion.md); everything else is a user parameter
PROTOCOL_OPTIONS = {"o", "in_parts", "in_3dref", "in_mask", "in_movies", "in_mics", "in_coords", "j",
                    "pipeline_control"}
PARTICLES_OUT = PARTICLES_FILE
# options that take exactly one argv item: words after them are stray (RELION's additional arguments)
SINGLE_VALUE_OPTIONS = {"o", "j", "pipeline_control"}
MAP_NODE_KINDS = ("consensus", "kmeans", "pc", "flexibility")  # attention maps are index maps: no nodes


class Terminated(BaseException):
    """SIGTERM (scancel, a queue's time limit, kill): end as aborted so that RELION does not wait forever."""


def _on_sigterm(signum, frame):  # pragma: no cover - exercised through a subprocess
    raise Terminated()


def parse_argv(argv: list[str]) -> tuple[dict[str, str | None], list[str]]:
    """RELION-style ``--key value`` pairs: a value is every following item up to the next ``--key``.

    Returns (options, stray items). Several items are joined with single spaces (RELION does not quote
    values); a key with no items gets None (a parameter with an empty value). The options in
    :data:`SINGLE_VALUE_OPTIONS` take one item only (``--j 4 extra``: ``extra`` is stray, not part of ``j``).
    """
    opts: dict[str, str | None] = {}
    stray: list[str] = []
    key: str | None = None
    vals: list[str] = []

    def flush() -> None:
        if key is not None:
            opts[key] = " ".join(vals) if vals else None

    for item in argv:
        if item.startswith("--") and len(item) > 2:
            flush()
            key, vals = item[2:], []
            if "=" in key:  # tolerate --key=value
                key, v = key.split("=", 1)
                vals.append(v)
        elif key is None or (key in SINGLE_VALUE_OPTIONS and vals):
            stray.append(item)
        else:
            vals.append(item)
    flush()
    return opts, stray


def help_text() -> str:
    rows = []
    for name, f in JobConfig.model_fields.items():
        default = "" if f.default is None else f.default
        if isinstance(default, bool):
            default = "yes" if default else "no"
        rows.append(f"  {name:<12} {str(default):<14} {f.description}")
    return (
        "cryoformer-relion: cryoFormer heterogeneous reconstruction as a RELION External job.\n\n"
        "In the RELION GUI: External job, 'External executable' = cryoformer-relion, 'Input particles' = a\n"
        "particles STAR file (e.g. Refine3D/jobNNN/run_data.star); optional parameters go into the\n"
        "'Params' tab as label / value pairs (up to 10). 'Running' tab: 'Number of threads' = CPU threads.\n\n"
        "RELION calls: cryoformer-relion --o External/jobNNN/ --in_parts PARTICLES.star [--LABEL VALUE ...] --j N\n\n"
        "  label        value (default) meaning\n" + "\n".join(rows) + "\n\n"
        "poses defaults to 'given' when the particles have rlnAngleRot/Tilt/Psi and to 'predict' otherwise.\n"
        "Outputs in --o: particles.star (input columns + rlnCryoformerZ1..K + rlnClassNumber), maps,\n"
        "RELION_OUTPUT_NODES.star. Run again with the same --o (Continue) to resume from the last checkpoint.\n"
        "Subset instead of training: label select_classes, value e.g. 1,3 (k-means classes, 1-based), with the\n"
        "particles.star of a cryoFormer job as input; select_invert yes keeps the other classes.\n"
        "Abort: RELION's Abort button (file RELION_JOB_ABORT_NOW) stops at the next step, keeping the checkpoint.\n"
        "See docs/relion.md."
    )


class _Log:
    """stdout -> run.out, stderr -> run.err; always flushed (RELION shows them while the job runs)."""

    worker_rank: int | None = None  # set for ranks > 0 of a torchrun group: they only report errors

    def __init__(self) -> None:
        self.t0 = time.monotonic()

    @staticmethod
    def _print(text: str, stream) -> None:
        """A log line that cannot fail: with run.out on a full disk the job must still end with an exit file."""
        try:
            print(text, file=stream, flush=True)
        except (OSError, ValueError):
            pass

    def out(self, msg: str) -> None:
        if self.worker_rank is not None:
            return
        stamp = time.strftime("%H:%M:%S")
        self._print(f"[{stamp}] {msg}", sys.stdout)

    def err(self, msg: str) -> None:
        if self.worker_rank is not None:
            self._print(f"[rank {self.worker_rank}] {msg}", sys.stderr)
            return
        self._print(msg, sys.stderr)
        # the GUI user reads run.out first: point at the error there as well
        self._print(f"[{time.strftime('%H:%M:%S')}] ERROR: {msg}", sys.stdout)

    def print_traceback(self) -> None:
        try:
            traceback.print_exc(file=sys.stderr)
        except (OSError, ValueError):
            pass


def _node_name(path: Path, out_dir: Path) -> str:
    """A node name relative to the project directory: ``--o`` joined with the file's place inside it.

    Never resolved: with ``External/`` a symlink to a scratch disk, the node must stay
    ``External/job003/x`` (what RELION calls the job), not ``../scratch/External/job003/x``. Relative
    paths are relative to the project directory (the working directory), as every path of the job.
    """
    p = Path(path)
    if p.is_absolute():
        for base in (Path(os.path.abspath(out_dir)), out_dir.resolve()):
            try:
                p = out_dir / p.relative_to(base)
                break
            except ValueError:
                continue
        else:
            return os.path.relpath(p, Path.cwd())
    return Path(os.path.normpath(p)).as_posix()


def run(opts: dict[str, str | None], out_dir: Path, log: _Log, *,
        should_abort: Callable[[], bool] | None = None) -> str | None:
    """The job proper; returns the exit file name to write (None: a torchrun rank > 0). Raises on errors."""
    version = _nodes.detect_version(out_dir)
    log.out(f"RELION version (from {out_dir / 'job.star'}): "
            + (version or "unknown (no job.star; writing 3.1 + 4.0 node types)"))

    from . import select as _select

    if _select.wanted(opts):  # a particle subset instead of training (label select_classes)
        return _select.run_select(opts, out_dir, version, log)

    in_parts, params = _inputs_and_parameters(opts, log)
    config = JobConfig.from_strings(params, source="External job parameters")
    star = _read_particles(in_parts, config, log)
    chosen = config.for_particles(star.record.has_poses, explicit="poses" in params,
                                  missing=f"{in_parts} has no rlnAngleRot/rlnAngleTilt/rlnAnglePsi")
    if chosen.poses != config.poses:
        log.out("the particles have no orientations: poses = predict")
    config = chosen
    log.out("settings: " + ", ".join(f"{k}={v}" for k, v in config.model_dump().items()))

    from cryoformer_ext.job.run import JobAborted, run_job

    abort = should_abort or (lambda: _nodes.abort_requested(out_dir))
    try:
        result = run_job(star.data, config, out_dir, log=log.out, should_abort=abort)
        if result is None:  # a rank > 0 under torchrun: rank 0 writes the outputs and the exit file
            return None
    except JobAborted:
        log.out("aborted on request (RELION_JOB_ABORT_NOW); the last checkpoint is kept: "
                "run again with the same output directory (Continue) to resume")
        return _nodes.EXIT_ABORTED
    part_path = _write_particles(star, result, out_dir, log)
    _write_nodes(result, part_path, out_dir, version, log)
    return _nodes.EXIT_SUCCESS


def _inputs_and_parameters(opts: dict[str, str | None], log: _Log) -> tuple[str, dict[str, str | None]]:
    """The input particles and the job parameters among RELION's options (unknown ones are warned about
    and dropped, RELION's thread count is ``threads`` unless that is set)."""
    in_parts = opts.get("in_parts")
    if not in_parts:
        raise UsageError("no input particles: set 'Input particles' (--in_parts) to a particles STAR file")
    for k in ("in_3dref", "in_mask", "in_movies", "in_mics", "in_coords"):
        if opts.get(k):
            log.out(f"note: --{k} {opts[k]} is not used by cryoFormer")
    params = {k: v for k, v in opts.items() if k not in PROTOCOL_OPTIONS}
    unknown = [k for k in params if k.replace("-", "_") not in JobConfig.model_fields]
    for k in unknown:
        log.out(f"WARNING: ignoring unknown option --{k} {params[k] or ''} (known parameters: "
                f"{', '.join(JobConfig.model_fields)})")
        params.pop(k)
    if "j" in opts and "threads" not in params and opts["j"]:
        params["threads"] = opts["j"]
    return in_parts, params


def _read_particles(in_parts: str, config: JobConfig, log: _Log) -> "ParticleStar":
    from cryoformer_ext.formats.star import read_particles_star

    cwd = Path.cwd()
    log.out(f"reading particles {in_parts} (image paths relative to {cwd})")
    star = read_particles_star(in_parts, root=cwd, check_images=True, require_ctf=config.ctf)
    rec = star.record
    log.out(f"{rec.n_particles} particles, box {rec.box}, {rec.pixel_size_A:.4f} Å/px, RELION {rec.relion_format}"
            f" STAR{'' if rec.version is None else f' (version {rec.version})'}, "
            f"{len(rec.optics_groups)} optics group(s), {len(rec.stack_files)} stack file(s), "
            f"poses: {'yes' if rec.has_poses else 'no'}, CTF: {'yes' if rec.has_ctf else 'no'}")
    for w in rec.warnings:
        log.out(f"note: {w}")
    return star


def _write_particles(star: "ParticleStar", result: "JobResult", out_dir: Path, log: _Log) -> Path:
    """``particles.star``: every input column, the latents, the k-means class, and the predicted
    orientations when the input had none."""
    latents = result.latents
    labels = result.labels
    if latents is not None and latents.size == 0:
        latents = None
    predicted = result.predicted_poses
    extra = star.predicted_pose_columns(predicted)
    if extra:
        log.out("the particles had no orientations: writing the predicted ones (rlnAngleRot/Tilt/Psi, origins)")
    elif predicted is not None:
        log.out("the input orientations are kept in particles.star; the refined ones are in predicted_poses.npz")
    part_path = star.write(out_dir / PARTICLES_OUT, latents=latents, labels=labels, extra=extra)
    log.out(f"wrote {part_path}" + ("" if latents is None else f" with rlnCryoformerZ1..{latents.shape[1]}")
            + ("" if labels is None else " and rlnClassNumber (k-means class, 1-based)"))
    return part_path


def _write_nodes(result: "JobResult", part_path: Path, out_dir: Path, version, log: _Log) -> None:
    node_list = [(_node_name(part_path, out_dir), "particles")]
    for m in result.maps:
        if m.kind in MAP_NODE_KINDS:
            node_list.append((_node_name(Path(m.path), out_dir), "map"))
        elif m.kind == "mask":  # the soft solvent mask, at the particles' box and pixel size by default
            node_list.append((_node_name(Path(m.path), out_dir), "mask"))
    _nodes.write_output_nodes(out_dir, node_list, version)
    log.out(f"output nodes: {len(node_list)} ({sum(1 for _, k in node_list if k == 'map')} maps, "
            f"{result.map_pixel_size_A:.4f} Å/voxel)")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or any(a in ("-h", "--help", "-help") for a in argv):
        print(help_text())
        return 0
    opts, stray = parse_argv(argv)
    log = _Log()
    log.worker_rank = _torchrun_worker_rank()
    out = opts.get("o")
    if not out:
        log.err("cryoformer-relion: --o <output directory> is required (RELION passes it); see --help")
        return 2
    out_dir = Path(out)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        log.err(f"cannot create the output directory {out_dir}: {err}")
        return 2
    log.out("cryoformer-relion " + " ".join(argv))
    if log.worker_rank is None:
        try:
            removed = _nodes.clear_exit_files(out_dir) + _nodes.clear_previous_outputs(out_dir, [PARTICLES_OUT])
        except OSError as err:
            log.err(f"cannot clear the previous run's files in {out_dir}: {os_error_message(err)}")
            return 2
        if removed:
            log.out(f"continuing in {out_dir} (removed the previous run's {', '.join(removed)}; "
                    "they are written again when this run succeeds)")
    if _nodes.abort_requested(out_dir):  # every torchrun rank sees it: none joins a group that never forms
        return _abort_at_start(out_dir, log) if log.worker_rank is None else 3
    if stray:
        log.out(f"WARNING: ignoring stray arguments {' '.join(stray)}")
    if "pipeline_control" in opts:
        log.out("note: --pipeline_control is ignored (exit files are always written to --o)")

    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread (e.g. called from a test runner thread)
        previous = None
    try:
        return _main_guarded(opts, out_dir, log)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _abort_at_start(out_dir: Path, log: _Log) -> int:
    """RELION deleted RELION_JOB_ABORT_NOW before the launch: this one is the user's Abort (e.g. while queued)."""
    log.out(f"{_nodes.ABORT_NOW} exists: Abort was pressed before the job started (e.g. while it waited in a "
            "queue); nothing was run. Continue starts the job (RELION removes the request first); when running "
            f"by hand, delete {out_dir / _nodes.ABORT_NOW} first")
    log.out("finished: aborted")
    _finish(out_dir, _nodes.EXIT_ABORTED, log)
    return 3


def _finish(out_dir: Path, which: str, log: _Log) -> None:
    """Write the exit file; logging never raises (see :class:`_Log`), so a full disk cannot skip this."""
    try:
        _nodes.write_exit(out_dir, which)
    except OSError as err:
        log.err(f"cannot write {out_dir / which}: {os_error_message(err)}; RELION will show the job as running: "
                "use 'Mark as failed'")


def _torchrun_worker_rank() -> int | None:
    """The rank of this process when torchrun started it as rank > 0 of several (see docs/distributed.md)."""
    try:
        world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    except ValueError:
        return None
    return rank if world > 1 and rank > 0 else None


def _main_guarded(opts: dict[str, str | None], out_dir: Path, log: _Log) -> int:
    writes_exit = log.worker_rank is None  # in a torchrun group only rank 0 writes the exit file
    try:
        status = run(opts, out_dir, log)
        if status is None:  # torchrun rank > 0: done with its share
            return 0
        log.out({_nodes.EXIT_SUCCESS: "finished: success", _nodes.EXIT_ABORTED: "finished: aborted"}[status])
        if writes_exit:
            _nodes.write_exit(out_dir, status)
    except (KeyboardInterrupt, Terminated) as err:
        log.err(("terminated by a signal" if isinstance(err, Terminated) else "interrupted")
                + "; the last finished epoch's checkpoint is kept: Continue resumes from it")
        if writes_exit:
            _finish(out_dir, _nodes.EXIT_ABORTED, log)
        return 130
    except Exception as err:  # noqa: BLE001 - every failure must end in RELION_JOB_EXIT_FAILURE
        message = str(err) if isinstance(err, UsageError) else _user_message(err)
        if message is None:  # a bug, not bad input: keep the traceback for the report
            log.print_traceback()
            message = f"{type(err).__name__}: {err}"
        log.err(message)
        if writes_exit:  # last: RELION may show run.err as soon as it sees the exit file
            _finish(out_dir, _nodes.EXIT_FAILURE, log)
        return 1
    return 0 if status == _nodes.EXIT_SUCCESS else 3


def _user_message(err: Exception) -> str | None:
    try:
        return user_message(err)
    except Exception:  # noqa: BLE001 - e.g. torch cannot be imported: still end with an exit file
        return None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
