"""Live mode: every cryosparc-tools (5.x) server call of the plugin lives in this module.

:func:`run_live` is the one entry point: it creates an external job in a workspace, connects the
particles, checks them, declares the outputs, runs the engine while the job shows "running" with
progress in its event log, saves the particles (passed through + ``components_mode_<k>`` slots) and one
``volume`` output per map, uploads the plots as job images, and marks the job completed -- or failed with
the error message (``job.stop(error=...)``).

Order of calls (cryosparc-tools 5.x rules: outputs are added before the job runs; datasets are saved
only while it runs)::

    create_external_job -> connect(particles) -> load_input -> [checks] -> add_output(...)
    -> start("running") -> engine -> alloc_output/save_output -> log_plot -> stop()

What only a live server can confirm is listed in ``docs/cryosparc.md``.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from cryoformer.data import ParticleData
from cryoformer_ext.formats import cs as cs_io
from cryoformer_ext.config import JobConfig, JobConfigError
from cryoformer_ext.formats.mrc_stack import ImageStackError
from cryoformer_ext.jobdir import OFFLINE_ENGINE_SUBDIR as ENGINE_SUBDIR  # the same engine folder in both modes

if TYPE_CHECKING:  # the engine's result type; the job layer itself is imported when a job runs
    from cryoformer_ext.job.run import JobResult

from .common import (
    Engine,
    PlannedVolume,
    default_engine,
    is_progress,
    map_output,
    map_title,
    planned_volumes,
    pose_config,
    published_maps,
)

INPUT_NAME = "particles"
INPUT_SLOTS = ["blob", "ctf", "?alignments3D"]
PARTICLES_OUTPUT = "particles"
MAP_SLOT = {"name": "map", "dtype": "blob"}
MAX_PLOTS = 20
ABORT_STATUSES = ("killed", "failed", "completed")


class LiveError(RuntimeError):
    """The live job could not run; the message is what the job's failure shows."""


@dataclass
class LiveSettings:
    project: str                       # P12
    workspace: str                     # W1
    particles: str                     # J24.particles (source job . output name)
    title: str = "cryoFormer"
    description: str = "cryoFormer heterogeneous reconstruction (latent coordinates and maps)"
    project_dir: Path | None = None    # the project directory as this machine sees it (default: server's path)
    work_dir: Path | None = None       # where the engine writes when the job folder is not reachable here
    base_url: str | None = None
    email: str | None = None
    password: str | None = None
    abort_poll_s: float = 30.0         # how often the job status is checked for a kill/stop from the UI


def parse_source(spec: str) -> tuple[str, str]:
    """``'J24.particles'`` (or ``J24/particles``) -> ``('J24', 'particles')``."""
    m = re.fullmatch(r"\s*(J\d+)[./:]([A-Za-z][0-9A-Za-z_]*)\s*", spec or "")
    if not m:
        raise LiveError(f"--particles {spec!r}: expected <job>.<output>, e.g. J24.particles")
    return m.group(1), m.group(2)


def connect(base_url: str | None = None, *, email: str | None = None, password: str | None = None):
    """A :class:`cryosparc.tools.CryoSPARC` from explicit values or, at call time, the usual environment
    variables (``CRYOSPARC_BASE_URL`` or ``CRYOSPARC_MASTER_HOSTNAME``/``CRYOSPARC_BASE_PORT``,
    ``CRYOSPARC_EMAIL``, ``CRYOSPARC_PASSWORD``); without a password, the login saved by
    ``python -m cryosparc.tools login`` is used."""
    from cryosparc.tools import CryoSPARC

    env = os.environ
    base_url = base_url or env.get("CRYOSPARC_BASE_URL") or None
    email = email or env.get("CRYOSPARC_EMAIL") or None
    password = password or env.get("CRYOSPARC_PASSWORD") or None
    host = env.get("CRYOSPARC_MASTER_HOSTNAME") or None
    port = env.get("CRYOSPARC_BASE_PORT") or None
    try:
        if base_url:
            return CryoSPARC(base_url, host=None, base_port=None, email=email, password=password)
        if host or port:
            return CryoSPARC(None, host=host, base_port=port, email=email, password=password)
    except (RuntimeError, ValueError, TypeError) as err:
        raise LiveError(f"cannot connect to cryoSPARC: {err}") from None
    raise LiveError("no cryoSPARC address: set CRYOSPARC_BASE_URL (e.g. http://localhost:39000) or give --base-url")


ABORT_ERRORS = ("JobAborted", "TrainingAborted")  # raised by run_job / the trainer after should_abort()


def _is_abort(err: BaseException) -> bool:
    return type(err).__name__ in ABORT_ERRORS


def _error_message(err: BaseException) -> str:
    if _is_abort(err):
        return f"aborted: {err}" if str(err) else "aborted: the job was stopped in cryoSPARC"
    if isinstance(err, KeyboardInterrupt):
        return "interrupted (SIGINT) on the machine running cryoformer-cryosparc"
    if isinstance(err, (cs_io.CsInputError, JobConfigError, ImageStackError, LiveError)):
        return str(err)
    return f"{type(err).__name__}: {err}"


class _JobLog:
    """Engine log -> cryoSPARC event log (progress lines update one event); failures to log are local only."""

    def __init__(self, job, local: Callable[[str], Any]):
        self.job = job
        self.local = local
        self._warned = False

    def __call__(self, msg: str, level: str = "text") -> None:
        msg = str(msg)
        self.local(msg)
        try:
            if level == "text" and is_progress(msg):
                self.job.log(msg, name="progress")
            else:
                self.job.log(msg, level=level)
        except Exception as err:  # noqa: BLE001 - never let the event log kill a training run
            if not self._warned:
                self.local(f"warning: could not write to the cryoSPARC job log ({err}); continuing")
                self._warned = True

    def warning(self, msg: str) -> None:
        self(msg, level="warning")


def _abort_check(job, poll_s: float) -> Callable[[], bool]:
    last = [time.monotonic()]

    def should_abort() -> bool:
        now = time.monotonic()
        if now - last[0] < poll_s:
            return False
        last[0] = now
        try:
            job.refresh()
            return str(job.status) in ABORT_STATUSES
        except Exception:  # noqa: BLE001 - a failed status check is not an abort
            return False

    return should_abort


def _work_dir(job, project_dir: Path, settings: LiveSettings) -> tuple[Path, Callable[[Path], str]]:
    """Where the engine writes, and how a written map becomes a project-relative ``map/path``.

    When the job folder is reachable here (shared file system) the engine writes into
    ``<job dir>/cryoformer`` and paths are project-relative. Otherwise it writes into a local folder and
    each published map is uploaded into the job folder through the API (``job.upload``).
    """
    job_dir = project_dir / str(job.model.job_dir or job.uid)
    if settings.work_dir is None and job_dir.is_dir() and os.access(job_dir, os.W_OK):
        work = job_dir / ENGINE_SUBDIR

        def publish_local(path: Path) -> str:
            rel = Path(path).resolve().relative_to(project_dir.resolve())
            return str(PurePosixPath(*rel.parts))

        return work, publish_local

    work = settings.work_dir or Path(tempfile.mkdtemp(prefix=f"cryoformer_{job.project_uid}_{job.uid}_"))
    made: set[str] = set()

    def publish_upload(path: Path) -> str:
        path = Path(path)
        try:
            rel = PurePosixPath(*path.resolve().relative_to(Path(work).resolve()).parts)
        except ValueError:
            rel = PurePosixPath("maps") / path.name
        target = PurePosixPath(ENGINE_SUBDIR) / rel
        parent = str(target.parent)
        if parent not in made:
            job.mkdir(parent, parents=True, exist_ok=True)
            made.add(parent)
        job.upload(target, path, overwrite=True)
        return str(PurePosixPath(job.uid) / target)

    return Path(work), publish_upload


def run_live(settings: LiveSettings, config: JobConfig, *, cs: Any = None, engine: Engine | None = None,
             log: Callable[[str], Any] = print) -> str:
    """Create, run and finish a cryoFormer external job; returns its uid (``J42``).

    Any error after the job exists marks it failed with the message and raises :class:`LiveError`.
    """
    src_job, src_output = parse_source(settings.particles)
    if cs is None:
        cs = connect(settings.base_url, email=settings.email, password=settings.password)
    try:
        project = cs.find_project(settings.project)
        job = project.create_external_job(settings.workspace, title=settings.title, desc=settings.description)
    except Exception as err:  # noqa: BLE001
        raise LiveError(f"cannot create an external job in {settings.project} {settings.workspace}: {err}") from None
    log(f"created external job {settings.project} {job.uid} in workspace {settings.workspace}")
    jlog = _JobLog(job, log)
    started = False
    try:
        project_dir = Path(settings.project_dir) if settings.project_dir else Path(str(project.dir))
        dset, data, config = _load_input(job, settings, src_job, src_output, project_dir, config, jlog)
        declared = _declare_outputs(job, config, len(data))
        job.start("running")
        started = True
        work, publish = _work_dir(job, project_dir, settings)
        jlog(f"engine folder: {work}")
        run_job = engine or default_engine()
        result = run_job(data, config, work, log=jlog, should_abort=_abort_check(job, settings.abort_poll_s))
        _save_particles(job, dset, result, config.zdim, jlog)
        _save_volumes(job, result, declared, publish, jlog)
        _upload_plots(job, result, jlog)
        job.stop()
        log(f"job {settings.project} {job.uid} completed")
        return job.uid
    except BaseException as err:
        msg = _error_message(err)
        if not isinstance(err, (cs_io.CsInputError, LiveError, JobConfigError, KeyboardInterrupt)) \
                and not _is_abort(err):
            try:
                job.log(traceback.format_exc(), level="error")
            except Exception:  # noqa: BLE001
                pass
        _fail(job, msg, started, log)
        if isinstance(err, KeyboardInterrupt):
            raise
        raise LiveError(msg) from err


def _load_input(job, settings: LiveSettings, src_job: str, src_output: str, project_dir: Path, config: JobConfig,
                jlog: "_JobLog") -> tuple[Any, ParticleData, JobConfig]:
    """Connect the source particles, read them, and choose the pose mode (the input dataset, the
    particles the engine gets, the config)."""
    job.connect(INPUT_NAME, src_job, src_output, slots=INPUT_SLOTS, title="Particles")
    dset = job.load_input(INPUT_NAME, slots="all")
    parts = cs_io.particles_from_dataset(dset, project_dir, source=f"{settings.project} {src_job}.{src_output}")
    for w in parts.warnings:
        jlog.warning(w)
    config, data = pose_config(config, parts.data, jlog)
    jlog(f"{len(data)} particles from {src_job}.{src_output}: box {data.box} px, {data.pixel_size_A:.4g} Å/px, "
         f"poses {'from alignments3D' if data.has_poses else 'predicted by the orientation encoder'}")
    return dset, data, config


def _declare_outputs(job, config: JobConfig, n_particles: int) -> dict[str, PlannedVolume]:
    """The outputs cryoSPARC must know before the job starts: the particles and the planned maps."""
    if config.zdim > 0:
        job.add_output("particle", PARTICLES_OUTPUT, slots=cs_io.component_slots(config.zdim),
                       passthrough=INPUT_NAME, title="Particles with cryoFormer latent coordinates")
    declared: dict[str, PlannedVolume] = {}
    for pv in planned_volumes(config, n_particles):
        job.add_output("volume", pv.output, slots=[MAP_SLOT], title=pv.title)
        declared[pv.output] = pv
    return declared


def _save_particles(job, dset, result: "JobResult", zdim: int, jlog: "_JobLog") -> None:
    if zdim == 0:
        return
    latents = np.asarray(result.latents)
    if latents.shape != (len(dset), zdim):
        raise LiveError(f"engine returned latents of shape {latents.shape}, expected ({len(dset)}, {zdim})")
    out = job.alloc_output(PARTICLES_OUTPUT, dset)
    cs_io.fill_components(out, latents)
    job.save_output(PARTICLES_OUTPUT, out)
    jlog(f"saved output '{PARTICLES_OUTPUT}': {len(out)} particles with {zdim} latent coordinates")


def _save_volumes(job, result: "JobResult", declared: dict[str, PlannedVolume], publish: Callable[[Path], str],
                  jlog: "_JobLog") -> None:
    """Every published map as a volume output; a map the plan did not foresee is added while the job runs."""
    psize = float(result.map_pixel_size_A)
    saved: list[str] = []
    for rec in published_maps(result.maps):
        name = map_output(rec.name)
        if name not in declared:
            try:  # adding an output while the job runs: not confirmed on a live server
                job.add_output("volume", name, slots=[MAP_SLOT], title=map_title(rec))
            except Exception as err:  # noqa: BLE001
                jlog.warning(f"map {rec.name} ({rec.path}) is in the job folder but could not be added as "
                             f"an output: {err}")
                continue
        rel = publish(Path(rec.path))
        vol = job.alloc_output(name, 1)
        cs_io.fill_volume(vol, rel, cs_io.mrc_shape(rec.path), psize)
        job.save_output(name, vol)
        saved.append(name)
    missing = [n for n in declared if n not in saved]
    if missing:
        jlog.warning(f"{len(missing)} declared volume outputs have no map (the analysis made fewer): "
                     + ", ".join(missing))
    jlog(f"saved {len(saved)} volume outputs ({psize:.4g} Å/voxel)")


def _upload_plots(job, result: "JobResult", jlog: "_JobLog") -> None:
    for png in [Path(p) for p in result.plots][:MAX_PLOTS]:
        try:
            job.log_plot(png, text=png.stem.replace("_", " "), formats=["png"])
        except Exception as err:  # noqa: BLE001 - a plot is not worth failing the job
            jlog.warning(f"could not upload plot {png.name}: {err}")


def _fail(job, msg: str, started: bool, log: Callable[[str], Any]) -> None:
    try:
        if not started:
            job.start("running")  # the vendor's life cycle: stop() follows start()
    except Exception:  # noqa: BLE001
        pass
    try:
        job.stop(error=msg)
    except Exception as err:  # noqa: BLE001
        log(f"warning: could not mark job {job.uid} as failed: {err}")
