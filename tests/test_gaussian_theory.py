"""Notes §7: on Gaussian data GPFQ's relative error falls roughly like 1/N0; MSQ's stays flat."""
import numpy as np
import torch

from gpfq.alphabet import layer_radius, make_alphabet
from gpfq.quantizer import gpfq_columns, msq


def _relative_squared_errors(n_inputs, m=64, n_neurons=32, bits=4, seed=0):
    generator = torch.Generator().manual_seed(seed + n_inputs)
    analog = torch.randn(m, n_inputs, generator=generator, dtype=torch.float64)
    weight = torch.rand(n_neurons, n_inputs, generator=generator, dtype=torch.float64) * 2 - 1
    alphabet = make_alphabet("gpfq2022", bits, 1.0, layer_radius(weight, 1.0))
    reference = (analog @ weight.T).pow(2).sum()
    gpfq = gpfq_columns(weight[None], analog[None], analog[None], alphabet, dtype=torch.float64)[0]
    rounded = msq(weight, alphabet)
    gpfq_error = float((analog @ (weight - gpfq).T).pow(2).sum() / reference)
    msq_error = float((analog @ (weight - rounded).T).pow(2).sum() / reference)
    return gpfq_error, msq_error


def test_gpfq_error_decays_like_one_over_n0_and_beats_msq():
    m = 64
    sizes = [4 * m, 8 * m, 16 * m]
    errors = [_relative_squared_errors(n, m) for n in sizes]
    gpfq_errors = np.array([e[0] for e in errors])
    msq_errors = np.array([e[1] for e in errors])
    slope = np.polyfit(np.log(sizes), np.log(gpfq_errors), 1)[0]
    assert -1.4 <= slope <= -0.7, slope  # roughly 1/N0
    msq_slope = np.polyfit(np.log(sizes), np.log(msq_errors), 1)[0]
    assert abs(msq_slope) < 0.2, msq_slope  # MSQ: flat in N0
    assert np.all(gpfq_errors * 3 < msq_errors), (gpfq_errors, msq_errors)
    assert gpfq_errors[-1] * 5 < msq_errors[-1]  # at N0 = 16m (measured: ~16x)
