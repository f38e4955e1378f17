"""CSV result logs: one header per log kind, one appended row per experiment.

This module knows the paper's columns and the plain log; a variant declares its own logs' columns.

A log is never overwritten: `init_log` renames an existing file with a timestamp,
and `append_row` refuses a file whose header is not the expected one.
"""
import csv
import fcntl
import io
import os
import time
from pathlib import Path

# The original repository's columns, in its order.
PAPER_COLUMNS = [
    "Model Name", "Dataset", "Quantization Batch Size", "Original Top1 Accuracy", "Quantized Top1 Accuracy",
    "Original Top5 Accuracy", "Quantized Top5 Accuracy", "Bits", "MLP_Alphabet_Scalar", "CNN_Alphabet_Scalar",
    "MLP_Percentile", "CNN_Percentile", "Include 0", "Retain_rate", "Seed", "Author",
]
# What this project adds, so a row says everything needed to reproduce it.
EXTRA_COLUMNS = [
    "Method", "Alphabet", "Alphabet Granularity", "Method Options", "Fold BatchNorm", "Sparsity", "Patch Stride",
    "Ignore Layers", "Engine", "Calibration", "Strict Coverage", "Quantized Tensors", "Quantized Parameters",
    "Largest Float",
    "Quantization Seconds", "Model File", "Package Version", "Code Revision",
    "Date",
    # the quantized model file (gpfq.deploy): levels L, ⌈log2 L⌉ and the codes' entropy per weight, bytes on disk
    "Levels", "Stored Bits", "Code Entropy", "Quantized File Bytes", "Size Ratio", "Quantized Model File",
    "World Size", "Backend",  # how many processes ran it, on which torch.distributed backend (gpfq.distributed)
]
PLAIN_LOG = "Quantization_Log.csv"
PLAIN_COLUMNS = PAPER_COLUMNS + EXTRA_COLUMNS
# Columns that record what a run measured, or who ran it when with which code, rather than what it was
# asked to do. Every other column is a hyperparameter: together they identify a grid point (`resume`).
# A variant's log declares its own result columns (`experiment.Variant.result_columns`).
RESULT_COLUMNS = {
    "Original Top1 Accuracy", "Quantized Top1 Accuracy", "Original Top5 Accuracy", "Quantized Top5 Accuracy",
    "Author", "Sparsity", "Quantization Seconds", "Model File", "Package Version", "Code Revision", "Date",
    "Levels", "Stored Bits", "Code Entropy", "Quantized File Bytes", "Size Ratio", "Quantized Model File",
    # How many processes ran it: a grid interrupted on 2 ranks resumes on 4 (results agree to rounding).
    "World Size", "Backend",
    "Quantized Tensors", "Quantized Parameters", "Largest Float",
}


class ForeignLogError(ValueError):
    """A CSV log exists but its header is not the one this project writes."""


def _header_line(columns) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(columns)
    return buffer.getvalue()


def check_log(path: Path, columns) -> bool:
    """True if the log exists with our header, False if it does not exist; raise if foreign."""
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return False
    with open(path, newline="") as f:
        header = next(csv.reader(f), [])
    if header != list(columns):
        raise ForeignLogError(
            f"{path} has a header this project did not write ({len(header)} columns, first {header[:3]}); "
            f"refusing to append. Move it aside, or run `python3 logs/init_logs.py`, which renames it "
            f"with a timestamp and starts a fresh log.")
    return True


def _unused_name(path: Path, stamp: str) -> Path:
    candidate = path.with_name(f"{path.stem}_{stamp}{path.suffix}")
    counter = 1
    while candidate.exists():
        candidate = path.with_name(f"{path.stem}_{stamp}_{counter}{path.suffix}")
        counter += 1
    return candidate


def init_log(path: Path, columns) -> Path:
    """Start a fresh log with its header; an existing one is renamed, never deleted.

    Returns the new name of the old log, or None if there was none.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if path.exists():
        old = _unused_name(path, time.strftime("%Y%m%d-%H%M%S"))
        os.rename(path, old)
    with open(path, "x", newline="") as f:
        f.write(_header_line(columns))
    return old


def append_row(path: Path, row: dict, columns) -> None:
    """Append one row (a dict keyed by column) under an exclusive lock, creating the log if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    missing = [c for c in columns if c not in row]
    unknown = [c for c in row if c not in columns]
    if missing or unknown:
        raise KeyError(f"row does not match {path.name}'s columns: missing {missing}, unknown {unknown}")
    line = io.StringIO()
    csv.writer(line, lineterminator="\n").writerow([row[c] for c in columns])
    with open(path, "a+", newline="") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            if not check_log(path, columns):
                print(f"{path} did not exist: created it with its header")
                f.write(_header_line(columns))
            elif not _ends_with_newline(path):  # a torn last line (a full disk): keep our row on its own line
                f.write("\n")
            f.write(line.getvalue())
            f.flush()
            os.fsync(f.fileno())
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def read_rows(path: Path) -> list:
    """All rows of a log as dicts."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
