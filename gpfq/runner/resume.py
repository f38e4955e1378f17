"""Resume: which grid points already have their row in the logs (`--resume` skips them)."""
from pathlib import Path

from gpfq.runner.header import point_columns
from gpfq.runner.logs import RESULT_COLUMNS, check_log, read_rows
from gpfq.runner.run_config import Point
from gpfq.runner.variant import PLAIN, Variant


def point_identity(point: Point, columns, variant: Variant = PLAIN) -> dict:
    """The values a point would log in the hyperparameter columns of a log: all but the results
    (logs.RESULT_COLUMNS and the variant's result_columns)."""
    values = point_columns(point)
    values.update(variant.own_columns(point))
    identity = [c for c in columns if c not in RESULT_COLUMNS and c not in variant.result_columns]
    unknown = [c for c in identity if c not in values]
    if unknown:  # a variant's column that is neither a result nor filled from the point: refuse to guess
        raise ValueError(f"resume cannot tell grid points apart: the log's columns {unknown} are neither results "
                         f"(gpfq.runner.logs.RESULT_COLUMNS, the variant's result_columns) nor filled from the "
                         f"point (header.point_columns, or the variant's columns)")
    return {c: values[c] for c in identity}


def _same_value(logged, value) -> bool:
    """A logged CSV cell against a hyperparameter value (numbers compare as numbers: 1 == 1.0)."""
    text = "" if value is None else str(value)
    if logged == text:
        return True
    try:
        return float(logged) == float(text)
    except (TypeError, ValueError):
        return False


def pending_points(points: list, log_dir: Path, variant: Variant = PLAIN) -> list:
    """The points whose row is not yet in each of their logs (a row with equal hyperparameter columns)."""
    rows_of = {}
    pending = []
    for point in points:
        for name in variant.log_names_of(point):
            if name not in rows_of:
                path = Path(log_dir) / name
                rows_of[name] = read_rows(path) if check_log(path, variant.logs[name]) else []
            identity = point_identity(point, variant.logs[name], variant)
            if not any(all(_same_value(row.get(c), v) for c, v in identity.items()) for row in rows_of[name]):
                pending.append(point)
                break
    return pending
