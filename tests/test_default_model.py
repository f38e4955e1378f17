"""The embedded default (fashion_resnet on the real Fashion-MNIST test set), end to end."""
import json
from pathlib import Path

import pytest

from gpfq.logs import read_rows

# default_runs: the session fixture in conftest.py (shared with the variants' tests).


def test_four_bit_gpfq_within_1_5_points_of_float(default_runs):
    _, rows = default_runs
    row = rows[("gpfq", 4)]
    assert row["Original Top1 Accuracy"] > 0.90  # the shipped model is really trained
    assert row["Quantized Top1 Accuracy"] >= row["Original Top1 Accuracy"] - 0.015


def test_three_bit_gpfq_beats_round_to_nearest(default_runs):
    _, rows = default_runs
    assert rows[("gpfq", 3)]["Quantized Top1 Accuracy"] > rows[("msq", 3)]["Quantized Top1 Accuracy"]


def test_rows_logged_and_models_saved(default_runs):
    out, rows = default_runs
    logged = read_rows(out / "logs" / "Quantization_Log.csv")
    assert len(logged) == 4
    for line in logged:
        row = rows[(line["Method"], int(line["Bits"]))]
        assert float(line["Quantized Top1 Accuracy"]) == row["Quantized Top1 Accuracy"]
        assert line["Model Name"] == "fashion_resnet" and line["Dataset"] == "fashion_mnist"
        assert int(line["Quantization Batch Size"]) == 512 and line["Include 0"] == "True"
        model_file = Path(line["Model File"])
        record = json.loads(model_file.with_suffix(".json").read_text())
        assert record["results"]["quantized_top1"] == pytest.approx(row["Quantized Top1 Accuracy"], abs=1e-6)
        assert record["hyperparameters"]["bits"] == int(line["Bits"])
        assert len(record["layers"]) == 10  # every Conv2d and Linear of fashion_resnet
