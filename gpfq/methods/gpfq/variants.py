"""The GPFQ family's layer rules with other rounding rules: stochastic GPFQ (SPFQ) and sparse GPFQ.

The walk is GPFQ's (`reference.gpfq_columns` or the blocked engine); only the rounding rule of
`gpfq.methods.rounding` changes. Shapes as `reference.gpfq_columns`: weight (G, N1, N0), rows (G, m, N0),
alphabet (L,) or (G, N1, L) -> Q (G, N1, N0).
"""
import torch

from gpfq.methods.gpfq.engine import gpfq_blocked
from gpfq.methods.gpfq.reference import gpfq_columns
from gpfq.methods.rounding import ThresholdedRounding, nearest_rounding, spfq_rounding


def gpfq_walk(weight, analog_input, quantized_input, alphabet, rounding=None, engine="auto", dtype=torch.float32,
              first_column="paper"):
    """GPFQ with `rounding` (None: nearest): the per-column loop for engine 'columns', else the blocked
    engine in the form `engine` ('auto', 'residual', 'gram'). first_column: as `reference.gpfq_columns`."""
    if engine == "columns":
        return gpfq_columns(weight, analog_input, quantized_input, alphabet, dtype, rounding or nearest_rounding,
                            first_column=first_column)
    return gpfq_blocked(weight, analog_input, quantized_input, alphabet, form=engine, dtype=dtype, rounding=rounding,
                        first_column=first_column)


def spfq(weight, analog_input, quantized_input, alphabet, seed: int, dtype=torch.float32, engine="auto"):
    """Stochastic GPFQ of one layer. Same seed, same Q."""
    return gpfq_walk(weight, analog_input, quantized_input, alphabet, spfq_rounding(weight.shape, seed, dtype), engine,
                     dtype)


def sparse_gpfq(weight, analog_input, quantized_input, alphabet, relative_threshold: float, kind: str,
                dtype=torch.float32, engine="auto"):
    """Sparse GPFQ of one layer: arguments thresholded by λ = relative_threshold · max|A|, then rounded."""
    return gpfq_walk(weight, analog_input, quantized_input, alphabet, ThresholdedRounding(relative_threshold, kind),
                     engine, dtype)
