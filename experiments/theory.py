"""The paper's single-layer theory, checked on Gaussian data (docs/theory.md).

    python3 experiments/theory.py                      # m = 256, N0 = m/4 … 16m, 5 trials
    python3 experiments/theory.py --m 64 --trials 3    # quicker

One layer, X (m × N0) i.i.d. N(0, 1), X̃ = X, weights uniform on [−1, 1], one alphabet per
layer. Writes <out>.csv (one row per N0, trial and method) and <out>.png (log-log mean
relative squared error against N0, with GPFQ's slope fitted on N0 ∈ [4m, 16m]).
"""
import argparse
import csv
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from tqdm import tqdm

from gpfq.runner.theory import THEORY_METHODS, TheoryAlphabet, fitted_slope, gaussian_layer_errors, mean_errors

LABELS = {"gpfq": "GPFQ", "msq": "MSQ (nearest)", "gptq": "GPTQ", "qronos": "Qronos"}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--m", type=int, default=256, help="rows of X (calibration samples)")
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--neurons", type=int, default=16, help="neurons (rows of W) per trial")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--alphabet", default="gpfq2022")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="+", default=list(THEORY_METHODS), choices=THEORY_METHODS)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "figures" / "theory"),
                        help="output path without extension (.csv and .png are written)")
    args = parser.parse_args(argv)
    if args.m < 4:
        parser.error("--m must be at least 4 (N0 starts at m/4)")
    n0_values = [args.m * 2 ** k // 4 for k in range(7)]  # m/4, m/2, …, 16m
    bar = tqdm(total=len(n0_values) * args.trials, desc="N0 × trials")
    rows = gaussian_layer_errors(args.m, n0_values, args.trials, args.neurons, args.seed, args.methods,
                                 TheoryAlphabet(args.alphabet, args.bits), progress=lambda n0, trial: bar.update(1))
    bar.close()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["m", "n0", "trial", "method", "bits", "relative_squared_error"])
        writer.writeheader()
        for row in rows:
            writer.writerow({"m": args.m, "bits": args.bits, **row})

    figure, axes = plt.subplots(figsize=(6, 4.2))
    low, high = 4 * args.m, 16 * args.m
    for method in args.methods:
        errors = mean_errors(rows, method)
        n0 = np.array(list(errors))
        slope = fitted_slope(errors, low, high)
        spread = [np.std([r["relative_squared_error"] for r in rows if r["method"] == method and r["n0"] == k])
                  for k in n0]
        axes.errorbar(n0, list(errors.values()), yerr=spread, marker="o", capsize=3,
                      label=f"{LABELS[method]} (slope {slope:.2f} on [4m, 16m])")
        print(f"{method}: " + ", ".join(f"N0={k}: {e:.2e}" for k, e in errors.items())
              + f"; slope on [{low}, {high}]: {slope:.3f}")
    gpfq_errors = mean_errors(rows, "gpfq") if "gpfq" in args.methods else None
    if gpfq_errors:
        guide = 1.6 * gpfq_errors[low]  # drawn a little above GPFQ so both stay visible
        axes.plot([low, high], [guide, guide * low / high], "k--", linewidth=1, label="∝ 1/N0 (guide)")
    axes.axvline(args.m, color="grey", linewidth=0.8, linestyle=":")
    axes.set_xscale("log", base=2)
    axes.set_yscale("log")
    axes.set_xlabel("N0 (weights per neuron); dotted line: N0 = m")
    axes.set_ylabel("‖Xw − Xq‖² / ‖Xw‖²  (mean over trials)")
    axes.set_title(f"One layer, Gaussian X, m = {args.m}, {args.bits} bits, {args.trials} trials × "
                   f"{args.neurons} neurons", fontsize=9)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out.with_suffix(".png"), dpi=120)
    print(f"wrote {out.with_suffix('.csv')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
