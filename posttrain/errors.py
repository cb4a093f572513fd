"""Errors a user can act on. Each message names what is wrong and where (file, key, row, value).

Stage entry points print these without a traceback and exit non-zero; anything else is a bug and
keeps its traceback.

Every user-facing error class of the library is defined here, so `except` clauses and docs have
one place to point at; the modules that raise them import them from here.
"""

from __future__ import annotations

import errno


class PipelineError(Exception):
    """Base class: a problem in the user's input or environment, explained in the message."""


class DataError(PipelineError):
    """Bad or missing data: names the file, the row or line, and the field."""


class StageError(PipelineError):
    """A stage could not finish (NaN loss, incompatible inputs, corrupted model, ...)."""


class ParamsChangedError(StageError):
    """params.yaml changed under a running stage: the model would not match what dvc.lock records."""


class ParamsError(PipelineError, ValueError):
    """A params file that cannot be used. The message names the file, the key path and the value."""


class UndeclaredDataError(PipelineError):
    """A user file `prepare` reads is not a dvc.yaml dependency, or a hub dataset is not pinned."""


class DagError(PipelineError):
    """dvc.yaml cannot be read as a pipeline, or a named stage does not exist in it."""


class WorkspaceBusy(PipelineError):
    """Another pipeline run holds this workspace."""


class TrackingError(PipelineError):
    """MLflow cannot be used as configured (unreachable server, failed write); says what to change."""


class ServicesError(PipelineError):
    """The local team services (`posttrain services`) cannot be started, reached or stopped as asked."""


class SeedsError(PipelineError):
    """The seed sweep (`posttrain seeds N`) could not be queued, run or read back."""


class PromotionError(TrackingError):
    """Promotion or rollback cannot be done as asked (no candidate, force without reason, ...)."""


# Exit status of a stage that ran out of memory or disk: rerunning the same command cannot help, so
# the Prefect flow does not retry it (flows/pipeline.py). Every other PipelineError exits 1.
EXIT_NOT_RETRYABLE = 3
_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_DISK_SIGNS = ("No space left", "Disk quota exceeded", "File too large", "file write failed", "unexpected pos")


class ResourceExhausted(StageError):
    """Out of memory or out of disk: the message says what to change; not retried."""

    exit_code = EXIT_NOT_RETRYABLE


def resource_error(error: BaseException, stage: str) -> ResourceExhausted | None:
    """The actionable error for an out-of-memory or disk-full failure, None for anything else.

    Recognised without importing torch: torch.OutOfMemoryError (CUDA), the CPU allocator's
    RuntimeError, Python's MemoryError; OSError ENOSPC/EDQUOT/EFBIG and torch.save's write failure.
    """
    text = str(error)
    if (
        isinstance(error, MemoryError)
        or type(error).__name__ == "OutOfMemoryError"
        or (isinstance(error, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text))
    ):
        return ResourceExhausted(
            f"out of memory ({type(error).__name__}: {text.strip().splitlines()[-1][:300]}); "
            f"not retried. Lower {stage}.trainer.per_device_train_batch_size (raise gradient_accumulation_steps "
            f"to keep the effective batch), set {stage}.gradient_checkpointing: true, or train a LoRA adapter "
            f"({stage}.lora)"
        )
    # safetensors (Rust) and torch.save (C++) report a failed write in their own words, not as OSError.
    disk = (isinstance(error, OSError) and error.errno in _DISK_ERRNOS) or any(sign in text for sign in _DISK_SIGNS)
    if disk:
        where = getattr(error, "filename", None) or text.strip().splitlines()[-1][:300]
        return ResourceExhausted(
            f"disk full or file size limit reached while writing ({type(error).__name__}: {where}); "
            "the previous model folder and complete checkpoints were kept (atomic writes), a half-written "
            "checkpoint is left unmarked. Free disk space and rerun: the stage resumes from its last complete "
            "checkpoint"
        )
    return None
