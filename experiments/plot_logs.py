"""Draw the paper's figures from the CSV logs.

    python3 experiments/plot_logs.py                               # logs/Quantization_Log.csv -> logs/figures/
    python3 experiments/plot_logs.py --log a.csv b.csv --where Alphabet=gpfq2022 --m 1024
    python3 experiments/plot_logs.py --log figures/fashion_resnet_log.csv --out figures   # the README's figures

The figures go to logs/figures/ unless --out says otherwise, so a run never replaces the README's
figures in figures/ with whatever logs/ holds.

For every model in the logs (its name made a file name: characters other than letters, digits, '.', '-'
become '_'): <model>_top1_vs_m.png (top-1 against m, one line per bit width,
float as a reference line; --method, --granularity choose the rows) and <model>_methods.png
(top-1 against bits, one line per method at one m: --m, else the m with the most rows).
--where COLUMN=VALUE keeps only matching rows (repeatable). --table prints, per model, a markdown
table of top-1 at that m (mean ± standard deviation over the logged seeds) instead of drawing.
"""
import argparse
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
from gpfq.runner.figures import M, plot_top1_against_bits, plot_top1_against_m, read_logs, seed_table, select

DEFAULT_OUT = ROOT / "logs" / "figures"


def figure_stem(model: str) -> str:
    """A file name for a model's figures: 'examples/my_model.py:build' -> 'examples_my_model.py_build' (a '/'
    would name a folder, a ':' is not allowed on Windows)."""
    return re.sub(r"[^\w.-]", "_", model).lstrip(".") or "model"


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
    frame = read_logs(args.log)
    for condition in args.where:
        column, _, value = condition.partition("=")
        if column not in frame:
            parser.error(f"--where {condition}: the logs have no column {column!r}")
        frame = select(frame, **{column: value})
    if args.table:
        for model in sorted(frame["Model Name"].unique()):
            m = args.m if args.m is not None else int(frame.loc[frame["Model Name"] == model, M].mode().max())
            print(f"{model}, m = {m}\n{seed_table(frame, model, m)}\n")
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for model in sorted(frame["Model Name"].unique()):
        rows = frame[frame["Model Name"] == model]
        path = out / f"{figure_stem(model)}_top1_vs_m.png"
        table = plot_top1_against_m(frame, model, path, args.method, args.granularity)
        print(f"{path}\n{table.round(4).to_string()}\n")
        m = args.m if args.m is not None else int(rows[M].mode().max())
        path = out / f"{figure_stem(model)}_methods.png"
        table = plot_top1_against_bits(frame, model, path, m)
        print(f"{path} (m = {m})\n{table.round(4).T.to_string()}\n")


if __name__ == "__main__":
    main()
