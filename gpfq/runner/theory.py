"""The single-layer theory check (docs/theory.md): GPFQ's error decays like 1/N0, round-to-nearest's does not.

One layer on Gaussian data: X (m × N0) i.i.d. N(0, 1), X̃ = X, weights uniform on [−1, 1],
the layer's alphabet (radius = mean over neurons of max |w|). For each N0 and trial, the
relative squared error ||X Wᵀ − X Qᵀ||_F² / ||X Wᵀ||_F² of each method's Q.
"""
import math
from dataclasses import dataclass

import numpy as np
import torch

from gpfq.methods.alphabet import layer_radius, make_alphabet
from gpfq.methods.gptq import gptq
from gpfq.methods.qronos import qronos
from gpfq.methods.gpfq.reference import gpfq_columns, msq

THEORY_METHODS = ("gpfq", "msq", "gptq", "qronos")


def _quantize(method, weight, data, alphabet):
    W, X = weight.unsqueeze(0), data.unsqueeze(0)
    if method == "gpfq":
        return gpfq_columns(W, X, X, alphabet, dtype=torch.float64)[0]
    if method == "msq":
        return msq(weight, alphabet)
    if method == "gptq":
        return gptq(W, X, alphabet, dtype=torch.float64)[0]
    if method == "qronos":  # with X̃ = X: GPTQ's walk with Qronos's ridge (1e-6 · λ_max instead of 1 % of mean H_tt)
        return qronos(W, X, X, alphabet, dtype=torch.float64)[0]
    raise ValueError(f"unknown method {method!r}; choose from {THEORY_METHODS}")


@dataclass(frozen=True)
class TheoryAlphabet:
    """The layer's alphabet: its kind (`make_alphabet`), bits, and scalar C (radius C · mean over neurons of max |w|)."""
    kind: str = "gpfq2022"
    bits: int = 4
    scalar: float = 1.0


def gaussian_layer_errors(m: int, n0_values, trials: int = 5, neurons: int = 16, seed: int = 0, methods=THEORY_METHODS,
                          alphabet: TheoryAlphabet = TheoryAlphabet(), progress=None) -> list:
    """[{n0, trial, method, relative_squared_error}] for every N0, trial and method (seeded, float64)."""
    unknown = [method for method in methods if method not in THEORY_METHODS]
    if unknown or m < 1 or trials < 1 or neurons < 1:
        raise ValueError(f"bad theory settings: methods {unknown or methods}, m {m}, trials {trials}, "
                         f"neurons {neurons}")
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for n0 in n0_values:
        for trial in range(trials):
            data = torch.randn(m, n0, generator=generator, dtype=torch.float64)
            weight = torch.rand(neurons, n0, generator=generator, dtype=torch.float64) * 2 - 1
            levels = make_alphabet(alphabet.kind, alphabet.bits, alphabet.scalar, layer_radius(weight, 1.0))
            analog_output = data @ weight.T
            for method in methods:
                quantized = _quantize(method, weight, data, levels)
                error = (analog_output - data @ quantized.T).pow(2).sum() / analog_output.pow(2).sum()
                rows.append({"n0": n0, "trial": trial, "method": method, "relative_squared_error": float(error)})
            if progress is not None:
                progress(n0, trial)
    return rows


def mean_errors(rows, method: str) -> dict:
    """{N0: mean over trials of the relative squared error} of one method."""
    by_n0 = {}
    for row in rows:
        if row["method"] == method:
            by_n0.setdefault(row["n0"], []).append(row["relative_squared_error"])
    return {n0: float(np.mean(values)) for n0, values in sorted(by_n0.items())}


def fitted_slope(errors: dict, low: float = -math.inf, high: float = math.inf) -> float:
    """Least-squares slope of log(error) against log(N0) over the N0 in [low, high]."""
    points = [(n0, e) for n0, e in errors.items() if low <= n0 <= high]
    if len(points) < 2:
        raise ValueError(f"need at least two N0 in [{low}, {high}] to fit a slope, got {len(points)}")
    x = np.log([n0 for n0, _ in points])
    y = np.log([e for _, e in points])
    return float(np.polyfit(x, y, 1)[0])
