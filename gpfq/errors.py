"""Errors the scripts report as one message, without a stack trace (see `gpfq.runner.cli.run_script`).

An error of these classes is an expected failure with a message that says what to do: bad input
(exit status 2) or a result that could not be written (exit status 1). Anything else is a bug, and
the scripts show its full stack trace. The classes also derive from the built-in error a caller
would catch (ValueError, FileNotFoundError, OSError, …).
"""
import errno


class GPFQError(Exception):
    """An expected failure whose message is the whole report."""
    exit_status = 1


class BadInputError(GPFQError):
    """The input (hyperparameters, data, weights, logs, folders) cannot give a meaningful run."""
    exit_status = 2


class BadHyperparameterError(BadInputError, ValueError):
    """A hyperparameter that is refused before any work starts."""


def bad_hyperparameter(message: str) -> BadHyperparameterError:
    """The error for a refused hyperparameter; its message starts with 'bad hyperparameter: '."""
    return BadHyperparameterError(f"bad hyperparameter: {message}")


class CalibrationInputError(BadInputError, ValueError):
    """Calibration inputs the model cannot be run on, or that cannot be batched (gpfq.pipeline.inputs)."""


class ResultWriteError(GPFQError, OSError):
    """A result (model, record or log row) could not be written, e.g. a full disk."""


def os_error_reason(error: OSError) -> str:
    """A short reason for a failed write: 'the disk is full (…)' for ENOSPC, else the error itself."""
    if getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
        return f"the disk is full: {error.strerror}"
    return f"{type(error).__name__}: {error}"


class ExportInputError(BadInputError, ValueError):
    """An ONNX export asked of something it cannot take: a bad input shape or dtype, a file without what it needs."""
