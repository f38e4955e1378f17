"""The paper's figures from the CSV logs (pandas, matplotlib).

- top-1 against the calibration size m, one line per bit width, the float model as a
  reference line (the paper's figure style), one figure per model;
- a method comparison: top-1 against bits, one line per method (and alphabet granularity,
  and options such as sparse GPFQ's threshold), at one m.
Repeated rows of the same setting (several seeds) are averaged.
"""
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from gpfq.runner.logs import clean_csv  # noqa: E402

TOP1, FLOAT_TOP1, M, BITS = "Quantized Top1 Accuracy", "Original Top1 Accuracy", "Quantization Batch Size", "Bits"
# Columns older logs may lack, with the value they imply.
IMPLIED = {"Method": "gpfq", "Alphabet Granularity": "layer", "Method Options": "", "Fold BatchNorm": False}


def read_logs(paths) -> pd.DataFrame:
    """The whole rows of every CSV log in `paths`, one frame (torn records reported and left out)."""
    frames = [pd.read_csv(io.StringIO(clean_csv(path)), keep_default_na=False) for path in paths]
    frame = pd.concat(frames, ignore_index=True)
    for column, value in IMPLIED.items():
        if column not in frame:
            frame[column] = value
    frame["Fold BatchNorm"] = frame["Fold BatchNorm"].astype(str).str.lower() == "true"
    return frame


def select(frame: pd.DataFrame, **equal) -> pd.DataFrame:
    """Rows whose columns equal the given values (keyword: column name with spaces as underscores)."""
    mask = pd.Series(True, index=frame.index)
    for key, value in equal.items():
        column = key.replace("_", " ") if key.replace("_", " ") in frame else key
        mask &= frame[column].astype(str) == str(value)
    return frame[mask]


def method_label(row) -> str:
    """What distinguishes a line of the method comparison: method, granularity, options."""
    label = str(row["Method"]).upper().replace("SPARSE_GPFQ", "sparse GPFQ").replace("QRONOS", "Qronos")
    if row["Method"] == "sparse_gpfq" and row["Method Options"]:
        label += f" ({row['Method Options']})"
    if row["Method"] != "gptq" and "act-order" in str(row["Method Options"]):  # GPTQ's act-order is its own
        label += ", act-order"
    if "first column code2022" in str(row["Method Options"]):
        label += ", 2022 first column"
    if row["Alphabet Granularity"] == "channel":
        label += ", per channel"
    if row["Fold BatchNorm"]:
        label += ", BN folded"
    return label


def top1_against_m(frame: pd.DataFrame, model: str, method: str = "gpfq", granularity: str = "layer") -> pd.DataFrame:
    """Mean top-1 of one model and method: index m, one column per bit width."""
    rows = frame[(frame["Model Name"] == model) & (frame["Method"] == method)
                 & (frame["Alphabet Granularity"] == granularity) & ~frame["Fold BatchNorm"]]
    return rows.groupby([M, BITS])[TOP1].mean().unstack(BITS).sort_index()


def top1_against_bits(frame: pd.DataFrame, model: str, m: int) -> pd.DataFrame:
    """Mean top-1 of one model at calibration size m: index bits, one column per method label."""
    rows = frame[(frame["Model Name"] == model) & (frame[M] == m)]
    labels = rows.apply(method_label, axis=1) if len(rows) else pd.Series(dtype=str)
    return rows.assign(label=labels).groupby(["label", BITS])[TOP1].mean().unstack("label").sort_index()


def seed_table(frame: pd.DataFrame, model: str, m: int) -> str:
    """A markdown table of one model at calibration size m: one row per method label, one column per bit
    width, each cell the mean top-1 over the logged seeds ± their standard deviation (n = seeds)."""
    rows = frame[(frame["Model Name"] == model) & (frame[M] == m)]
    if rows.empty:
        raise ValueError(f"no rows with m = {m} for model {model!r} in the logs")
    rows = rows.assign(label=rows.apply(method_label, axis=1))
    stats = rows.groupby(["label", BITS])[TOP1].agg(["mean", "std", "count"])
    bits = sorted(rows[BITS].unique())
    lines = ["| method | " + " | ".join(f"{b} bits" for b in bits) + " |", "|---" * (len(bits) + 1) + "|"]
    for label in sorted(rows["label"].unique()):
        cells = []
        for b in bits:
            if (label, b) not in stats.index:
                cells.append("")
                continue
            mean, std, count = stats.loc[(label, b)]
            cells.append(f"{mean:.4f}" + (f" ± {std:.4f} (n={int(count)})" if count > 1 else " (n=1)"))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def float_top1(frame: pd.DataFrame, model: str) -> float:
    return float(frame.loc[frame["Model Name"] == model, FLOAT_TOP1].mean())


def plot_top1_against_m(frame, model, path: Path, method="gpfq", granularity="layer") -> pd.DataFrame:
    table = top1_against_m(frame, model, method, granularity)
    if table.empty:
        raise ValueError(f"no {method} rows with {granularity} alphabets for model {model!r} in the logs")
    figure, axes = plt.subplots(figsize=(6, 4.2))
    for bits in table.columns:
        series = table[bits].dropna()
        axes.plot(series.index, series.values, marker="o", label=f"{bits} bits")
    axes.axhline(float_top1(frame, model), color="k", linestyle="--", linewidth=1, label="float")
    axes.set_xscale("log", base=2)
    axes.set_xlabel("calibration size m (images per layer)")
    axes.set_ylabel("top-1 accuracy")
    axes.set_title(f"{model}: {method.upper()}, {granularity} alphabets", fontsize=10)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return table


def plot_top1_against_bits(frame, model, path: Path, m: int, zoom: float = 0.07) -> pd.DataFrame:
    """Left: the whole range; right: the same lines within `zoom` of the float accuracy."""
    table = top1_against_bits(frame, model, m)
    if table.empty:
        raise ValueError(f"no rows with m = {m} for model {model!r} in the logs")
    reference = float_top1(frame, model)
    figure, panels = plt.subplots(1, 2, figsize=(11, 4.6))
    for axes in panels:
        for label in table.columns:
            series = table[label].dropna()
            style = "--" if "per channel" in label else "-"
            axes.plot(series.index, series.values, marker="o", linestyle=style, label=label)
        axes.axhline(reference, color="k", linestyle=":", linewidth=1, label="float")
        axes.set_xticks(sorted(table.index))
        axes.set_xlabel("bits")
        axes.set_ylabel("top-1 accuracy")
    panels[0].set_title(f"{model}: methods on the same alphabets, m = {m}", fontsize=10)
    panels[1].set_ylim(reference - zoom, reference + zoom / 10)
    panels[1].set_title(f"within {zoom:.2f} of float", fontsize=10)
    panels[0].legend(fontsize=7, loc="lower right")  # the full-range panel has room below the lines
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return table
