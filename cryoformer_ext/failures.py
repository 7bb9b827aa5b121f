"""One clear line for every failure a user can cause or fix, shared by every entry point.

The CLI, the RELION External job and the cryoSPARC adapters all end a failed job the same way: one
message that names the file and the problem, instead of a Python traceback. Tracebacks are kept for
what is left: programming errors, which a user should report rather than fix.
"""

from __future__ import annotations

import errno

RESUME_HINT = "run the job again with the same output folder (RELION: Continue) to resume from the last finished epoch"


def os_error_message(err: OSError) -> str:
    """A full disk, a folder without write permission, a read-only disk: say which, and where."""
    where = err.filename if err.filename is not None else None
    at = f" ({where})" if where else ""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"no space left on device{' while writing ' + str(where) if where else ''}: "
                f"free some space, then {RESUME_HINT}")
    if err.errno in (errno.EACCES, errno.EPERM):
        return (f"permission denied{at}: the job cannot write (or read) there; check the owner and mode of that "
                "folder, or choose another output folder")
    if err.errno == errno.EROFS:
        return f"read-only file system{at}: choose an output folder on a writable disk"
    return f"{where + ': ' if where else ''}{err.strerror or err}"


def user_message(err: BaseException) -> str | None:
    """The message for an expected failure, or None for an unexpected one (a bug: show the traceback)."""
    from cryoformer.train import CheckpointReadError, CheckpointWriteError

    from cryoformer_ext.config import JobConfigError
    from cryoformer_ext.formats.mrc_stack import ImageStackError
    from cryoformer_ext.job.launch import WorkerFailed
    from cryoformer_ext.formats.star import StarFileError

    known: tuple[type[BaseException], ...] = (StarFileError, JobConfigError, ImageStackError, WorkerFailed,
                                              CheckpointReadError, CheckpointWriteError)
    try:
        from cryoformer_ext.formats.cs import CsInputError

        known += (CsInputError,)
    except ImportError:  # cryosparc-tools missing: no .cs input either
        pass
    if isinstance(err, known):
        return str(err)
    if isinstance(err, FloatingPointError):
        return (f"training diverged: {err}. Lower the learning rate (parameter lr), and check the particles for "
                f"extreme pixel values; then {RESUME_HINT} (or start a new job)")
    if isinstance(err, OSError):
        return os_error_message(err)
    if type(err).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError
        first = str(err).splitlines()[0] if str(err) else ""
        return f"out of GPU memory ({first}): lower batch_size or train_box, then {RESUME_HINT}"
    if isinstance(err, MemoryError):
        return f"out of memory: lower batch_size or train_box, then {RESUME_HINT}"
    return None
