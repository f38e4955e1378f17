"""Draw the paper's figures from the CSV logs.

    python3 experiments/plot_logs.py                               # logs/Quantization_Log.csv -> logs/figures/
    python3 experiments/plot_logs.py --log a.csv b.csv --where Alphabet=gpfq2022 --m 1024
    python3 experiments/plot_logs.py --log figures/fashion_resnet_log.csv --out figures   # the README's figures

The figures go to logs/figures/ unless --out says otherwise, so a run never replaces the README's
figures in figures/ with whatever logs/ holds.

For every model in the logs (its name made a file name: characters other than letters, digits, '.', '-'
become '_'; a name longer than 100 bytes is cut, with a hash of the whole name appended): <model>_top1_vs_m.png (top-1 against m, one line per bit width,
float as a reference line; --method, --granularity choose the rows) and <model>_methods.png
(top-1 against bits, one line per method at one m: --m, else the m with the most rows).
--where COLUMN=VALUE keeps only matching rows (repeatable). --table prints, per model, a markdown
table of top-1 at that m (mean ± standard deviation over the logged seeds) instead of drawing.
"""
import argparse
import hashlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
from gpfq.errors import BadInputError, GPFQError
from gpfq.runner.cli import run_script
from gpfq.runner.figures import BITS, M, TOP1, plot_top1_against_bits, plot_top1_against_m, read_logs, seed_table, select

DEFAULT_OUT = ROOT / "logs" / "figures"
MAX_STEM_BYTES = 100  # of a figure's file name before its suffix (a file name holds at most 255 bytes)


def figure_stem(model: str) -> str:
    """A file name for a model's figures: 'examples/my_model.py:build' -> 'examples_my_model.py_build' (a '/'
    would name a folder, a ':' is not allowed on Windows)."""
    stem = re.sub(r"[^\w.-]", "_", model).lstrip(".") or "model"
    if len(stem.encode()) > MAX_STEM_BYTES:  # file names hold at most 255 bytes: cut, and keep names apart by a hash
        digest = hashlib.sha256(model.encode()).hexdigest()[:12]
        stem = stem.encode()[:MAX_STEM_BYTES - 13].decode(errors="ignore") + "_" + digest
    return stem


def read_checked(paths, where):
    """The logs' rows (`read_logs`), with --where applied; BadInputError, one line, for a log that is missing,
    empty, not a quantization log, or without rows (to match)."""
    for path in map(Path, paths):
        if not path.is_file():
            raise BadInputError(f"log {path} {'is a folder' if path.is_dir() else 'not found'}; pass the CSV logs "
                                f"with --log PATH …")
        if path.stat().st_size == 0:
            raise BadInputError(f"log {path} is empty (not even a header): nothing to draw")
    frame = read_logs(paths)
    missing = [c for c in ("Model Name", TOP1, M, BITS) if c not in frame]
    if missing:
        raise BadInputError(f"{', '.join(map(str, paths))}: no column {', '.join(missing)}; not a log of the "
                            f"quantization scripts")
    if frame.empty:
        raise BadInputError(f"{', '.join(map(str, paths))} holds no rows (only a header): nothing to draw; run an "
                            f"experiment first")
    for condition in where:
        column, _, value = condition.partition("=")
        if column not in frame:
            raise BadInputError(f"--where {condition}: the logs have no column {column!r}")
        frame = select(frame, **{column: value})
    if frame.empty:
        raise BadInputError(f"no row of {', '.join(map(str, paths))} matches --where {' '.join(where)}: nothing to "
                            f"draw")
    return frame


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log", nargs="+", default=[str(ROOT / "logs" / "Quantization_Log.csv")])
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="folder of the figures (default: logs/figures)")
    parser.add_argument("--method", default="gpfq", help="method of the top-1-against-m figure")
    parser.add_argument("--granularity", default="layer", choices=("layer", "channel"))
    parser.add_argument("--m", type=int, default=None, help="calibration size of the method comparison")
    parser.add_argument("--where", nargs="*", default=[], metavar="COLUMN=VALUE")
    parser.add_argument("--table", action="store_true", help="print the seed-averaged markdown table, draw nothing")
    args = parser.parse_args(argv)
    frame = read_checked(args.log, args.where)
    if args.table:
        for model in sorted(frame["Model Name"].unique()):
            m = args.m if args.m is not None else int(frame.loc[frame["Model Name"] == model, M].mode().max())
            print(f"{model}, m = {m}\n{seed_table(frame, model, m)}\n")
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    failed = []
    for model in sorted(frame["Model Name"].unique()):
        rows = frame[frame["Model Name"] == model]
        try:  # one model's figures that cannot be written do not stop the others'
            path = out / f"{figure_stem(model)}_top1_vs_m.png"
            table = plot_top1_against_m(frame, model, path, args.method, args.granularity)
            print(f"{path}\n{table.round(4).to_string()}\n")
            m = args.m if args.m is not None else int(rows[M].mode().max())
            path = out / f"{figure_stem(model)}_methods.png"
            table = plot_top1_against_bits(frame, model, path, m)
            print(f"{path} (m = {m})\n{table.round(4).T.to_string()}\n")
        except OSError as error:
            failed.append(f"{path} ({type(error).__name__}: {error.strerror or error})")
    if failed:
        raise GPFQError(f"could not write {len(failed)} figure{'s' if len(failed) > 1 else ''}: {'; '.join(failed)}; "
                        f"the others are in {out}")


if __name__ == "__main__":
    run_script(main)
