"""Worker processes for data-parallel jobs: one per GPU (NCCL) or N CPU ranks (gloo), or join torchrun.

Three ways a job runs (:func:`job_plan`):

* ``single``: one process, as before (``gpus`` empty or one id, ``ranks`` unset or 1);
* ``spawn``: this process starts one worker per GPU of ``gpus`` (``--gpus 0,1,2,3``) or ``ranks`` CPU
  workers, hosts their rendezvous (a ``TCPStore`` on 127.0.0.1), forwards rank 0's log lines and the
  host's abort requests, and watches them: when one dies the others are stopped and
  :class:`WorkerFailed` names the rank and the cause (signal or exception), no hang;
* ``joined``: ``RANK``/``WORLD_SIZE`` (and ``MASTER_ADDR``/``MASTER_PORT``) are set by ``torchrun``,
  Slurm + torchrun, etc.: this process is one rank of that group (multi-node); rank 0 writes outputs.

Every collective has a timeout (``CRYOFORMER_DIST_TIMEOUT_S``, default 600 s), so a rank that hangs
instead of dying also ends the job.
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import os
import pickle
import queue
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal

import torch

from cryoformer_ext.config import JobConfig, JobConfigError

ABORT_TYPES = ("JobAborted", "TrainingAborted")
GRACE_S = 5.0  # after a failure: time the other ranks get to report their own error before being stopped


class WorkerFailed(RuntimeError):
    """A worker process of a data-parallel job died or raised; the other workers were stopped."""

    def __init__(self, message: str, *, rank: int | None = None, kind: str | None = None):
        super().__init__(message)
        self.rank, self.kind = rank, kind


def dist_timeout() -> datetime.timedelta:
    return datetime.timedelta(seconds=float(os.environ.get("CRYOFORMER_DIST_TIMEOUT_S", "600")))


@dataclass
class Plan:
    mode: Literal["single", "spawn", "joined"]
    world: int = 1
    gpus: list[str] = field(default_factory=list)  # physical (CUDA_VISIBLE_DEVICES) id of each local rank

    @property
    def backend(self) -> str:
        return "nccl" if self.gpus else "gloo"


def _visible_gpu_names() -> list[str] | None:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is None:
        return None
    return [x.strip() for x in env.split(",") if x.strip() != ""]


def physical_gpus(ids: list[int]) -> list[str]:
    """The ``CUDA_VISIBLE_DEVICES`` names of visible GPU indices ``ids`` (index ``i`` = the i-th GPU this
    process sees), for a spawned worker that must see exactly its GPU: under a scheduler's
    ``CUDA_VISIBLE_DEVICES=4,5,6,7``, index 0 is GPU ``4``, not ``0``."""
    visible = _visible_gpu_names() or [str(i) for i in range(torch.cuda.device_count())]
    return [visible[i] for i in ids]


def device_id_kwargs(device: torch.device) -> dict:
    """``device_id`` for ``init_process_group`` (binds NCCL to this rank's GPU at once) where this torch
    has the argument: it arrived around torch 2.2/2.3 (pytorch#114916), and pyproject allows 2.2.
    Without it the current device (set before) and the barrier's ``device_ids`` do the binding."""
    import torch.distributed as tdist

    if device.type != "cuda" or "device_id" not in inspect.signature(tdist.init_process_group).parameters:
        return {}
    return {"device_id": device}


def job_plan(config: JobConfig, env: dict[str, str] | None = None) -> Plan:
    """How many processes run ``config`` and on which devices (no process or CUDA context is started)."""
    env = os.environ if env is None else env
    if int(env.get("WORLD_SIZE", "1") or 1) > 1 and "RANK" in env:
        return Plan("joined", int(env["WORLD_SIZE"]))
    refuse_bare_srun_tasks(env)
    ids = config.gpu_ids()
    if len(ids) > 1:
        if config.ranks not in (None, len(ids)):
            raise JobConfigError(f"parameter 'ranks' = {config.ranks}, but 'gpus' = {config.gpus!r} names "
                                 f"{len(ids)} GPUs (one worker per GPU; leave 'ranks' empty)")
        if len(set(ids)) != len(ids):
            raise JobConfigError(f"parameter 'gpus' = {config.gpus!r} names a GPU twice")
        if not torch.cuda.is_available():
            raise JobConfigError(f"parameter 'gpus' = {config.gpus!r}, but no CUDA device is available here")
        count = torch.cuda.device_count()
        if max(ids) >= count:
            raise JobConfigError(f"parameter 'gpus' = {config.gpus!r}: only {count} GPU(s) visible")
        return Plan("spawn", len(ids), physical_gpus(ids))
    if (config.ranks or 1) > 1:
        if ids:
            raise JobConfigError(f"parameter 'ranks' = {config.ranks} runs CPU workers; with 'gpus' = "
                                 f"{config.gpus!r} give one GPU id per worker instead")
        return Plan("spawn", int(config.ranks))
    return Plan("single")


SRUN_TORCHRUN = ('srun --ntasks-per-node=1 torchrun --nnodes="$SLURM_NNODES" --nproc_per_node=<GPUs per node> '
                 '--rdzv_id="$SLURM_JOB_ID" --rdzv_backend=c10d '
                 '--rdzv_endpoint="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1):29500" '
                 '-m cryoformer_ext.commands train ...')


def refuse_bare_srun_tasks(env) -> None:
    """``srun -n 4 cryoformer train ...`` starts four processes that are not one group: each would train
    the whole job alone and write the same output folder. Slurm's task variables alone do not make a
    torch.distributed group (no rendezvous address), so such a task stops with the launch to use:
    torchrun under srun (one agent per node), or one task with ``gpus`` on one node."""
    tasks = int(env.get("SLURM_STEP_NUM_TASKS", "1") or 1)
    if tasks <= 1:
        return
    proc = env.get("SLURM_PROCID", "?")
    raise JobConfigError(
        f"this is Slurm task {proc} of {tasks} (srun -n {tasks}), not a rank of a torch.distributed group: "
        f"{tasks} independent jobs would write one output folder. Run one task per node that starts torchrun: "
        f"{SRUN_TORCHRUN}; or, on one node, one task with '--gpus 0,1,2,3' (docs/distributed.md)")


def threads_per_rank(config: JobConfig, local_world: int) -> int:
    """``threads`` (RELION's --j) is the job's CPU threads on one machine, shared by its local ranks."""
    total = config.threads or os.cpu_count() or 1
    return max(1, total // max(local_world, 1))


# ---------------------------------------------------------------------------------------- joined
@contextlib.contextmanager
def joined_group(config: JobConfig) -> Iterator[torch.device]:
    """Join the group described by torchrun's environment; yields this rank's device."""
    import torch.distributed as tdist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    torch.set_num_threads(threads_per_rank(config, local_world))
    ids = config.gpu_ids()
    use_gpu = bool(ids) or torch.cuda.is_available()
    if ids and local_rank >= len(ids):
        raise JobConfigError(f"parameter 'gpus' = {config.gpus!r} names {len(ids)} GPU(s), but this is local rank "
                             f"{local_rank} of {local_world} on this node: give one id per local rank, or leave "
                             "'gpus' empty (local rank k then uses GPU k)")
    if use_gpu:
        index = ids[local_rank] if ids else local_rank
        if index >= torch.cuda.device_count():
            raise JobConfigError(f"local rank {local_rank} needs GPU {index}, but {torch.cuda.device_count()} "
                                 "are visible (one torchrun process per GPU: --nproc_per_node <= GPUs)")
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    owned = not tdist.is_initialized()
    if owned:
        tdist.init_process_group("nccl" if use_gpu else "gloo", init_method="env://", timeout=dist_timeout(),
                                 **device_id_kwargs(device))
    try:
        yield device
    finally:
        if owned and tdist.is_initialized():
            tdist.destroy_process_group()


# ---------------------------------------------------------------------------------------- spawn
def _watch_parent(parent_pid: int) -> None:
    """End this worker when the launching process is gone (killed with SIGKILL, say)."""
    def run() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(70)
            time.sleep(1.0)

    threading.Thread(target=run, daemon=True, name="parent-watch").start()


def _entry(rank: int, world: int, port: int, gpu: str | None, threads: int, fn: Callable, args: tuple,
           q, abort_event, parent_pid: int) -> None:
    """Body of one spawned worker: pin the GPU, join the group, run ``fn(*args, log=, should_abort=)``."""
    if gpu is not None:  # before any CUDA call: this worker sees exactly its GPU, as cuda:0
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the launcher, which stops the workers
    _watch_parent(parent_pid)
    torch.set_num_threads(threads)
    import torch.distributed as tdist

    code = 0
    try:
        device = torch.device("cuda", 0) if gpu is not None else torch.device("cpu")
        if gpu is not None:
            torch.cuda.set_device(device)
        store = tdist.TCPStore("127.0.0.1", port, world, is_master=False, timeout=dist_timeout())
        tdist.init_process_group("nccl" if gpu is not None else "gloo", store=store, rank=rank,
                                 world_size=world, timeout=dist_timeout(), **device_id_kwargs(device))

        def log(msg: str) -> None:
            q.put(("log", rank, str(msg)))

        result = fn(*args, device=device, log=log, should_abort=abort_event.is_set)
        if rank == 0:  # plain pickle: by value (torch's queue reducers would share memory with an exiting process)
            q.put(("result", rank, pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)))
    except BaseException as err:  # noqa: BLE001 - reported to the launcher, which decides
        kind = type(err).__name__
        if kind not in ABORT_TYPES:
            traceback.print_exc()
        q.put(("error", rank, (kind, str(err))))
        code = 1
    # No process-group teardown and no interpreter teardown: with a peer gone (or finishing at another
    # time) they can block or call std::terminate. Flush what the launcher must get, then leave.
    q.close()
    q.join_thread()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)  # skip interpreter teardown that can block on a dead peer's sockets


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def spawn(fn: Callable, args: tuple, plan: Plan, *, threads: int, log: Callable[[str], Any] = print,
          should_abort: Callable[[], bool] = lambda: False, poll_s: float = 0.1) -> Any:
    """Run ``fn(*args, device=, log=, should_abort=)`` in ``plan.world`` spawned workers (one process
    group); returns rank 0's return value. ``fn`` must be importable (a module-level function)."""
    import torch.distributed as tdist
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    store = tdist.TCPStore("127.0.0.1", 0, plan.world + 1, is_master=True, timeout=dist_timeout(),
                           wait_for_workers=False)
    q = ctx.Queue()
    abort_event = ctx.Event()
    procs = []
    for rank in range(plan.world):
        gpu = plan.gpus[rank] if plan.gpus else None
        p = ctx.Process(target=_entry, name=f"cryoformer-rank{rank}",
                        args=(rank, plan.world, store.port, gpu, threads, fn, args, q, abort_event, os.getpid()))
        p.start()
        procs.append(p)
    where = ", ".join(f"rank {r}: pid {p.pid}" + (f" GPU {plan.gpus[r]}" if plan.gpus else "")
                      for r, p in enumerate(procs))
    log(f"started {plan.world} workers ({plan.backend}; {where})")

    result, have_result = None, False
    errors: list[tuple[int, str, str]] = []  # in arrival order
    failed_at: float | None = None
    codes: list[int | None] = []

    def handle(item) -> None:
        nonlocal result, have_result
        tag, rank, payload = item
        if tag == "log":
            log(payload)
        elif tag == "result":
            result, have_result = pickle.loads(payload), True
        elif tag == "error":
            errors.append((rank, payload[0], payload[1]))

    try:
        while True:
            try:
                handle(q.get(timeout=poll_s))
                while True:
                    handle(q.get_nowait())
            except queue.Empty:
                pass
            if not abort_event.is_set() and should_abort():
                abort_event.set()
                log("abort requested: stopping the workers at their next step")
            codes = [p.exitcode for p in procs]
            if failed_at is None and (errors or any(c not in (None, 0) for c in codes)):
                failed_at = time.monotonic()
            if failed_at is not None and (all(c is not None for c in codes)
                                          or time.monotonic() - failed_at > GRACE_S):
                break
            if failed_at is None and all(c == 0 for c in codes):
                break
    finally:
        codes = [p.exitcode for p in procs]  # before _stop: its SIGTERMs are not a cause
        _stop(procs)
        with contextlib.suppress(Exception):
            while True:
                handle(q.get_nowait())
        q.close()
        del store
    if failed_at is None and have_result:
        return result
    raise _failure(procs, codes, errors, plan)


def _stop(procs) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + 5.0
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join(2.0)


def _failure(procs, codes: list[int | None], errors: list[tuple[int, str, str]], plan: Plan) -> WorkerFailed:
    n = plan.world
    aborts = [e for e in errors if e[1] in ABORT_TYPES]
    real = [e for e in errors if e[1] not in ABORT_TYPES]
    reported = {e[0] for e in errors}  # a rank that reported its error first died of that error
    signalled = [(r, procs[r].pid, c) for r, c in enumerate(codes) if c is not None and c < 0 and r not in reported]
    if signalled:  # a peer's death shows up on the others as communication errors: name the death first
        r, pid, c = signalled[0]
        also = f" (rank {errors[0][0]} then reported {errors[0][1]}: {errors[0][2][:200]})" if errors else ""
        return WorkerFailed(f"worker rank {r} of {n} (pid {pid}) was killed by {_signal_name(c)}; "
                            f"the other workers were stopped{also}", rank=r, kind="signal")
    if real:
        r, kind, msg = real[0]
        return WorkerFailed(f"worker rank {r} of {n} failed: {kind}: {msg}", rank=r, kind=kind)
    if aborts:
        r, kind, msg = min(aborts)
        return WorkerFailed(msg, rank=r, kind=kind)
    bad = [(r, c) for r, c in enumerate(codes) if c not in (0, None)]
    if bad:
        r, c = bad[0]
        return WorkerFailed(f"worker rank {r} of {n} (pid {procs[r].pid}) exited with status {c}", rank=r,
                            kind="exit")
    return WorkerFailed("the workers ended without a result from rank 0", kind="exit")
