"""The figures' tables from a small hand-made log."""
import pytest

from helpers import append_log_row as append_row
from helpers import plain_log_columns, plot_logs_script, top1_by_bits, top1_by_m

PLAIN_LOG = "Quantization_Log.csv"
PLAIN_COLUMNS = plain_log_columns()
PLOT_LOGS = plot_logs_script()  # the figures' reader, tables and plots, as experiments/plot_logs.py has them
read_logs, seed_table = PLOT_LOGS["read_logs"], PLOT_LOGS["seed_table"]
plot_top1_against_m, plot_top1_against_bits = PLOT_LOGS["plot_top1_against_m"], PLOT_LOGS["plot_top1_against_bits"]

# (method, granularity, options, bits, m, seed, top-1)
RUNS = [("gpfq", "layer", "", 3, 64, 0, 0.80), ("gpfq", "layer", "", 3, 64, 1, 0.84),
        ("gpfq", "layer", "", 3, 256, 0, 0.88), ("gpfq", "layer", "", 4, 256, 0, 0.90),
        ("msq", "layer", "", 3, 256, 0, 0.70), ("msq", "channel", "", 3, 256, 0, 0.75),
        ("sparse_gpfq", "layer", "soft threshold 0.1", 4, 256, 0, 0.86)]


@pytest.fixture
def log(tmp_path):
    path = tmp_path / PLAIN_LOG
    for method, granularity, options, bits, m, seed, top1 in RUNS:
        row = {column: "" for column in PLAIN_COLUMNS}
        row.update({"Model Name": "toy", "Quantization Batch Size": m, "Original Top1 Accuracy": 0.92,
                    "Quantized Top1 Accuracy": top1, "Bits": bits, "Seed": seed, "Method": method,
                    "Alphabet Granularity": granularity, "Method Options": options, "Fold BatchNorm": False})
        append_row(path, row, PLAIN_COLUMNS)
    return path


def test_top1_against_m_averages_seeds_per_bit_width(log, tmp_path):
    frame = read_logs([log])
    table = top1_by_m(frame, "toy")
    assert table.loc[64, 3] == pytest.approx(0.82)
    assert table.loc[256, 3] == pytest.approx(0.88)
    assert table.loc[256, 4] == pytest.approx(0.90)
    assert list(table.index) == [64, 256]
    plot_top1_against_m(frame, "toy", tmp_path / "m.png")
    assert (tmp_path / "m.png").stat().st_size > 10_000


def test_method_comparison_has_one_line_per_method_setting(log, tmp_path):
    frame = read_logs([log])
    table = top1_by_bits(frame, "toy", 256)
    assert sorted(table.columns) == ["GPFQ", "MSQ", "MSQ, per channel", "sparse GPFQ (soft threshold 0.1)"]
    assert table.loc[3, "MSQ, per channel"] == pytest.approx(0.75)
    assert table.loc[4, "sparse GPFQ (soft threshold 0.1)"] == pytest.approx(0.86)
    plot_top1_against_bits(frame, "toy", tmp_path / "b.png", 256)
    assert (tmp_path / "b.png").stat().st_size > 10_000
    with pytest.raises(ValueError, match="no rows"):
        plot_top1_against_bits(frame, "toy", tmp_path / "c.png", 512)


def test_seed_table_gives_mean_and_spread_per_method_setting(log, tmp_path):
    path = tmp_path / "more.csv"
    for method, options, seed, top1 in (("qronos", "damping 1e-06", 0, 0.86), ("qronos", "damping 1e-06", 1, 0.90),
                                        ("gpfq", "act-order", 0, 0.87)):
        row = {column: "" for column in PLAIN_COLUMNS}
        row.update({"Model Name": "toy", "Quantization Batch Size": 64, "Original Top1 Accuracy": 0.92,
                    "Quantized Top1 Accuracy": top1, "Bits": 3, "Seed": seed, "Method": method,
                    "Alphabet Granularity": "layer", "Method Options": options, "Fold BatchNorm": False})
        append_row(path, row, PLAIN_COLUMNS)
    table = seed_table(read_logs([log, path]), "toy", 64).splitlines()
    assert table[0] == "| method | 3 bits |"
    # GPFQ: 0.80 and 0.84 (sample standard deviation 0.0283); Qronos: 0.86 and 0.90; act-order GPFQ apart
    assert table[2:] == ["| GPFQ | 0.8200 ± 0.0283 (n=2) |", "| GPFQ, act-order | 0.8700 (n=1) |",
                         "| Qronos | 0.8800 ± 0.0283 (n=2) |"]



def test_plot_logs_reports_unusable_logs_in_one_line_and_draws_long_model_names(log, tmp_path):
    """An empty, missing or header-only log is one line and exit status 2; a 300-character model name is a figure."""
    import runpy
    from helpers import run_python
    import sys
    from conftest import python_env
    from gpfq.paths import REPO_ROOT
    script = REPO_ROOT / "experiments" / "plot_logs.py"
    rows = log.read_text().splitlines()
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "header_only.csv").write_text(rows[0] + "\n")
    for name, message in (("empty.csv", "is empty (not even a header): nothing to draw"),
                          ("missing.csv", "not found; pass the CSV logs with --log PATH …"),
                          ("header_only.csv", "holds no rows (only a header): nothing to draw; run an experiment first")):
        run = run_python([sys.executable, str(script), "--log", str(tmp_path / name), "--out", str(tmp_path / "f")],
                         capture_output=True, text=True, env=python_env(), timeout=300)
        assert run.returncode == 2 and run.stdout == "", (name, run.stdout, run.stderr)
        assert run.stderr.startswith("error: ") and run.stderr.endswith(message + "\n") and run.stderr.count("\n") == 1
    plot_logs = runpy.run_path(str(script))
    (tmp_path / "long.csv").write_text("\n".join(rows + [r.replace("toy", "m" * 300, 1) for r in rows[1:]]) + "\n")
    plot_logs["main"](["--log", str(tmp_path / "long.csv"), "--out", str(tmp_path / "figures")])
    names = sorted(p.name for p in (tmp_path / "figures").iterdir())
    assert len(names) == 4 and "toy_methods.png" in names  # the other model's figures are drawn too
    assert all(len(n.encode()) <= 120 for n in names) and any(n.startswith("m" * 87 + "_") for n in names)
