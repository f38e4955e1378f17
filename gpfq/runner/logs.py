"""CSV result logs: one header per log kind, one appended row per experiment.

This module knows the paper's columns and the plain log; a variant declares its own logs' columns.

A log is never overwritten: `init_log` renames an existing file with a timestamp,
and `append_row` refuses a file whose header is not the expected one.

Torn records. A crash or a full disk can leave the last record half written, possibly inside a
quoted field; a CSV parser would then read every later row as part of that open quote. So every
reader goes through `scan_log`, which keeps the whole records (the header's number of fields,
quotes closed) and reports the others, and `append_row` first moves an incomplete last record to
`<log>.torn-<timestamp>` so that its row starts on a clean line. A failed write is undone
(the log is cut back to its old length) and raised as one `LogWriteError`.
"""
import csv
import fcntl
import io
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from gpfq.errors import BadInputError, ResultWriteError, os_error_reason
from gpfq.paths import LOG_DIR

# The original repository's columns, in its order.
PAPER_COLUMNS = [
    "Model Name", "Dataset", "Quantization Batch Size", "Original Top1 Accuracy", "Quantized Top1 Accuracy",
    "Original Top5 Accuracy", "Quantized Top5 Accuracy", "Bits", "MLP_Alphabet_Scalar", "CNN_Alphabet_Scalar",
    "MLP_Percentile", "CNN_Percentile", "Include 0", "Retain_rate", "Seed", "Author",
]
# What this project adds, so a row says everything needed to reproduce it.
EXTRA_COLUMNS = [
    "Method", "Alphabet", "Alphabet Granularity", "Method Options", "Fold BatchNorm", "Sparsity", "Patch Stride",
    "Ignore Layers", "Engine", "Calibration", "Strict Coverage", "Act Bits", "Act Granularity", "Act Calibration",
    "Quantized Tensors", "Quantized Parameters",
    "Largest Float", "Weights",
    "Eval Subset",  # blank: the whole evaluation set; N: accuracy on a class-balanced N images (data.eval_subset)
    "Quantization Seconds", "Model File", "Package Version", "Code Revision",
    "Date",
    # the quantized model file (gpfq.runner.deploy): levels L, ⌈log2 L⌉ and the codes' entropy per weight, bytes on disk
    "Levels", "Stored Bits", "Code Entropy", "Quantized File Bytes", "Size Ratio", "Quantized Model File",
    "World Size", "Backend",  # how many processes ran it, on which torch.distributed backend (gpfq.pipeline.distributed)
    "Warnings",
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
    "Warnings",
}


class ForeignLogError(BadInputError, ValueError):
    """A CSV log exists but its header is not the one this project writes."""


class LogPathError(BadInputError, IsADirectoryError):
    """A log's path that is a folder (or another non-file), so no row can go there."""


class LogWriteError(ResultWriteError):
    """A row could not be appended (e.g. a full disk); the log was left as it was."""


def _header_line(columns) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(columns)
    return buffer.getvalue()


def init_logs_command(folder) -> str:
    """The command that starts fresh logs in `folder` (the default folder needs no option)."""
    folder = Path(folder)
    if folder.resolve() == LOG_DIR.resolve():
        return "python3 logs/init_logs.py"
    return f"python3 logs/init_logs.py --log_dir {shlex.quote(str(folder))}"


def check_is_file(path: Path) -> None:
    """LogPathError if something other than a file (a folder) holds the log's name."""
    if path.exists() and not path.is_file():
        kind = "a folder" if path.is_dir() else "not a regular file"
        raise LogPathError(f"log {path} is {kind}, not a CSV file, so no row can be appended to it; move it "
                           f"aside, or choose another folder with --log_dir PATH")


def check_log(path: Path, columns) -> bool:
    """True if the log exists with our header, False if it does not exist; raise if foreign (or a folder)."""
    path = Path(path)
    check_is_file(path)
    if not path.exists() or path.stat().st_size == 0:
        return False
    with open(path, newline="") as f:
        header = next(csv.reader(f), [])
    if header != list(columns):
        missing = [c for c in columns if c not in header]
        if set(PAPER_COLUMNS) <= set(header) and header == [c for c in columns if c in header]:
            raise ForeignLogError(
                f"{path} was written by an earlier version of this project (it lacks the columns "
                f"{', '.join(missing)}); refusing to append. Run `{init_logs_command(path.parent)}`, which renames "
                f"it with a timestamp and starts a fresh log, or choose another folder with --log_dir PATH.")
        raise ForeignLogError(
            f"{path} has a header this project did not write ({len(header)} columns, first {header[:3]}); "
            f"refusing to append. Move it aside, or run `{init_logs_command(path.parent)}`, which renames it "
            f"with a timestamp and starts a fresh log.")
    return True


def holds_only_header(path: Path, columns) -> bool:
    """True if the log exists and holds exactly our header and nothing else (a fresh log)."""
    path = Path(path)
    return path.is_file() and path.read_bytes() == _header_line(columns).encode()


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
    check_is_file(path)  # a folder is never renamed as if it were an old log
    path.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if path.exists():
        old = _unused_name(path, time.strftime("%Y%m%d-%H%M%S"))
        os.rename(path, old)
    with open(path, "x", newline="") as f:
        f.write(_header_line(columns))
    return old


# ---------------------------------------------------------------- reading
@dataclass
class LogScan:
    """A log split into whole records and torn ones (byte offsets into the file)."""
    header: list
    rows: list  # whole records after the header, each a list of fields
    torn: list = field(default_factory=list)  # (line number, text) of every torn record
    clean_end: int = 0  # offset just after the last whole record (or the header): a torn tail starts here


def _fields(record: bytes):
    """The fields of one record, or None if it is not one whole CSV record (a quote left open, several records)."""
    if record.count(b'"') % 2:
        return None
    parsed = list(csv.reader(io.StringIO(record.decode("utf-8", errors="replace"), newline="")))
    return parsed[0] if len(parsed) == 1 else None


def scan_log(data: bytes) -> LogScan:
    """Split a log's bytes into whole records and torn ones.

    A record is whole when its quotes are closed, it ends with a newline and it has the header's number
    of fields. A quoted field may span lines; but a record with a quote left open is torn as soon as the
    next line is a whole record by itself, so a torn record never hides the rows after it.
    """
    lines = data.split(b"\n")
    tail = lines.pop()  # text after the last newline: a torn record unless empty
    scan = LogScan(header=[], rows=[])
    n_fields, offset, line_number = None, 0, 0
    pending, pending_start, pending_line = b"", 0, 0

    def finish(record, start, number):
        nonlocal n_fields
        fields = _fields(record)
        if n_fields is None and fields is not None:
            scan.header, n_fields = fields, len(fields)
        elif fields is not None and len(fields) == n_fields:
            scan.rows.append(fields)
        else:
            scan.torn.append((number, record.decode("utf-8", errors="replace")))
            return
        scan.clean_end = start + len(record)

    for line in lines:
        line += b"\n"
        line_number += 1
        start, offset = offset, offset + len(line)
        if pending:
            whole = _fields(line)
            if whole is not None and n_fields is not None and len(whole) == n_fields:
                scan.torn.append((pending_line, pending.decode("utf-8", errors="replace")))
                pending = b""
            else:
                pending += line
                if _fields(pending) is not None:
                    finish(pending, pending_start, pending_line)
                    pending = b""
                continue
        if not line.strip():  # a blank line is not a record (csv readers skip it too)
            continue
        if line.count(b'"') % 2:
            pending, pending_start, pending_line = line, start, line_number
        else:
            finish(line, start, line_number)
    if pending or tail.strip():
        scan.torn.append((pending_line if pending else line_number + 1,
                          (pending + tail).decode("utf-8", errors="replace")))
    return scan


def report_torn(path: Path, torn: list, file=None) -> None:
    """Say on the console which records of `path` are torn (they are left out, never mixed into rows)."""
    for number, text in torn:
        preview = text.strip()
        preview = preview if len(preview) <= 60 else preview[:30] + " … " + preview[-25:]
        print(f"warning: {path}, line {number}: an incomplete record (a write cut short, e.g. by a crash or a "
              f"full disk) is left out: {preview!r}", file=file or sys.stderr)


def read_log(path: Path, report: bool = True) -> LogScan:
    """The whole records of a log (torn ones reported on the console, not mixed into rows)."""
    with open(path, "rb") as f:
        fcntl.flock(f, fcntl.LOCK_SH)  # a row being appended right now is not mistaken for a torn one
        try:
            data = f.read()
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
    scan = scan_log(data)
    if report and scan.torn:
        report_torn(path, scan.torn)
    return scan


def read_rows(path: Path) -> list:
    """All whole rows of a log as dicts keyed by its header (torn records are reported and left out)."""
    scan = read_log(path)
    return [dict(zip(scan.header, row)) for row in scan.rows]


def clean_csv(path: Path) -> str:
    """The log's header and whole records as CSV text (for pandas: `pd.read_csv(io.StringIO(...))`)."""
    scan = read_log(path)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(scan.header)
    writer.writerows(scan.rows)
    return buffer.getvalue()


# ---------------------------------------------------------------- writing
def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _move_torn_tail(path: Path, f, scan: LogScan, data: bytes) -> None:
    """Move the bytes after the last whole record to <log>.torn-<timestamp> and cut the log there."""
    sidecar = path.with_name(f"{path.name}.torn-{time.strftime('%Y%m%d-%H%M%S')}")
    counter = 1
    while sidecar.exists():
        sidecar = path.with_name(f"{path.name}.torn-{time.strftime('%Y%m%d-%H%M%S')}_{counter}")
        counter += 1
    with open(sidecar, "xb") as out:
        out.write(data[scan.clean_end:])
        out.flush()
        os.fsync(out.fileno())
    f.truncate(scan.clean_end)
    print(f"warning: {path} ended in an incomplete record (a write cut short, e.g. by a crash or a full disk); "
          f"moved it to {sidecar} and appended the new row on a clean line", file=sys.stderr)


def append_row(path: Path, row: dict, columns, saved: str = "") -> None:
    """Append one row (a dict keyed by column) under an exclusive lock, creating the log if needed.

    An incomplete last record is first moved to a sidecar file, so the row starts on a clean line.
    A write that fails (a full disk) is undone and raised as LogWriteError; `saved` (e.g. where the
    model is) goes into its message.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    missing = [c for c in columns if c not in row]
    unknown = [c for c in row if c not in columns]
    if missing or unknown:
        raise KeyError(f"row does not match {path.name}'s columns: missing {missing}, unknown {unknown}")
    line = io.StringIO()
    csv.writer(line, lineterminator="\n").writerow([row[c] for c in columns])
    try:
        f = open(path, "a+b")
    except OSError as error:  # read-only, immutable, or its folder gone and not creatable
        raise LogWriteError(f"could not append the row to {path} ({os_error_reason(error)}); the log is unchanged."
                            + (f" {saved}" if saved else "")) from error
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another process is appending, or holds the log: say so rather than hang silently
            print(f"waiting for the lock on {path} (another process holds it) ...", file=sys.stderr, flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        size = f.seek(0, os.SEEK_END)
        try:
            if not check_log(path, columns):
                if size == 0:
                    print(f"{path} did not exist: created it with its header")
                payload = _header_line(columns) + line.getvalue()
            else:
                f.seek(0)
                data = f.read()
                scan = scan_log(data)
                if scan.clean_end < len(data):
                    _move_torn_tail(path, f, scan, data)
                    size = scan.clean_end
                payload = line.getvalue()
            _write_all(f.fileno(), payload.encode())
            os.fsync(f.fileno())
        except OSError as error:
            f.truncate(size)  # no half-written row left behind
            raise LogWriteError(f"could not append the row to {path} ({os_error_reason(error)}); the log is unchanged."
                                + (f" {saved}" if saved else "")) from error
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
