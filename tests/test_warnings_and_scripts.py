"""Hostile-new-user rough edges: degenerate calibration data, the chance warning, file names from model
names, the scripts run from anywhere, Ctrl-C mid-point (one process and several ranks), the `layers=`
rule order and the offline example."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import Subset, TensorDataset

import gpfq
from gpfq.network import reports_as_dicts

from conftest import TESTS_DIR, python_env

REPO = TESTS_DIR.parent
PYTHON = sys.executable


# ---------------------------------------------------------------- degenerate calibration data
def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))


@pytest.mark.parametrize("engine", ["gram", "residual"])  # streamed sums, and rows
def test_zero_calibration_data_warns_and_error_is_undefined(engine):
    """All-zero images: layer 1's input is zero (‖XWᵀ‖ = 0, error undefined, not 0); layer 3's input is
    relu(bias), the same on every row. Both get their own warning, and no 'alphabet too coarse' guess."""
    lines = []
    result = gpfq.quantize(_mlp(), torch.zeros(64, 1, 4, 4), gpfq.QuantConfig(bits=4, batch_size=32, engine=engine),
                           log=lines.append)
    first, last = result.reports
    assert math.isnan(first.relative_error) and math.isnan(result.relative_errors["1"])
    assert any("float input is zero on all 32 calibration rows" in w for w in first.warnings)
    assert not any("alphabet too coarse" in w for w in first.warnings)
    assert any("float input is the same on all 32 calibration rows" in w for w in last.warnings)
    assert math.isfinite(last.relative_error)  # X = 1·cᵀ with c = relu(b) ≠ 0: the error is defined
    line = next(text for text in lines if text.startswith("[1/2] 1 Linear"))
    assert "rel. error undefined (the layer's float output is zero on the calibration data)" in line
    assert "WARNING: its float input is zero" in line and "rel. error 0.0000" not in line
    # the JSON record: null, never a misleading 0 (and strict JSON: no NaN literal)
    record = json.loads(json.dumps(reports_as_dicts(result.reports), allow_nan=False))
    assert record[0]["relative_error"] is None and record[1]["relative_error"] == pytest.approx(last.relative_error)


def test_ordinary_calibration_data_has_no_input_warning():
    result = gpfq.quantize(_mlp(), torch.randn(64, 1, 4, 4), gpfq.QuantConfig(bits=4, batch_size=32),
                           log=lambda text: None)
    assert all(math.isfinite(r.relative_error) and 0 < r.relative_error < 1 for r in result.reports)
    assert not any("float input" in w for r in result.reports for w in r.warnings)


# ---------------------------------------------------------------- the chance warning
def test_chance_warning_counts_the_evaluation_classes_and_says_below():
    from gpfq.experiment import chance_warnings, classes_in
    labels = torch.arange(1000) % 10
    data = TensorDataset(torch.zeros(1000, 1), labels)
    assert classes_in(data) == 10
    two = Subset(data, [i for i in range(1000) if labels[i] < 2])  # 2 classes left of 10 model outputs
    assert classes_in(two) == 2 and classes_in(Subset(two, [0, 2, 4])) == 1
    assert classes_in(TensorDataset(torch.zeros(3, 1))) is None  # no labels: unknown
    # far below chance is not "within 2 points" of it
    assert chance_warnings(0.0, 10) == ["final top-1 0.0000 is below chance (0.1000 for 10 classes): worse than "
                                        "guessing"]
    assert chance_warnings(0.49, 2) == ["final top-1 0.4900 is within 2 points of chance (0.5000 for 2 classes)"]
    assert chance_warnings(0.53, 2) == []


# ---------------------------------------------------------------- plot_logs and model names with '/'
