"""The GPFQ family's layer rules with other rounding rules: stochastic GPFQ (SPFQ) and sparse GPFQ, and the
`Method` objects of GPFQ, SPFQ, sparse GPFQ and their baseline MSQ (round to the nearest level).

The walk is GPFQ's (`reference.gpfq_columns` or the blocked engine); only the rounding rule of
`gpfq.methods.rounding` changes. Shapes as `reference.gpfq_columns`: weight (G, N1, N0), rows (G, m, N0),
alphabet (L,) or (G, N1, L) -> Q (G, N1, N0).
"""
import torch

from gpfq.methods.gpfq.column_order import gram_in_order, restore_columns, rows_in_order
from gpfq.methods.gpfq.engine import RoundingSettings, gpfq_blocked, gpfq_gram, gpfq_residual
from gpfq.methods.gpfq.reference import gpfq_columns, msq
from gpfq.methods.method import Method, order_option
from gpfq.methods.rounding import ThresholdedRounding, nearest_rounding, spfq_rounding


def gpfq_walk(weight, analog_input, quantized_input, alphabet, rounding=None, engine="auto", dtype=torch.float32):
    """GPFQ with `rounding` (None: nearest): the per-column loop for engine 'columns', else the blocked
    engine in the form `engine` ('auto', 'residual', 'gram')."""
    if engine == "columns":
        return gpfq_columns(weight, analog_input, quantized_input, alphabet, dtype, rounding or nearest_rounding)
    return gpfq_blocked(weight, analog_input, quantized_input, alphabet, form=engine, dtype=dtype,
                        rounding=RoundingSettings(rounding))


def spfq(weight, analog_input, quantized_input, alphabet, seed: int, dtype=torch.float32, engine="auto"):
    """Stochastic GPFQ of one layer. Same seed, same Q."""
    return gpfq_walk(weight, analog_input, quantized_input, alphabet, spfq_rounding(weight.shape, seed, dtype), engine,
                     dtype)


def sparse_gpfq(weight, analog_input, quantized_input, alphabet, relative_threshold: float, kind: str,
                dtype=torch.float32, engine="auto"):
    """Sparse GPFQ of one layer: arguments thresholded by λ = relative_threshold · max|A|, then rounded."""
    return gpfq_walk(weight, analog_input, quantized_input, alphabet, ThresholdedRounding(relative_threshold, kind),
                     engine, dtype)


# The GPFQ family's layer rules under a QuantConfig. Each puts the columns in `config.column_order` and calls the
# engine form itself, so that the default path is gpfq.quantize → the layer loop → this rule → the form → the
# kernel (docs/design.md). From rows, config.engine is the layer's form, chosen once by `Method.form` (the
# pipeline) or, given "auto" (a direct call), by `gpfq_blocked`; from sums, the form is 'gram'.

def walk_from_rows(rounding_of):
    """A GPFQ-family rule on rows (G, m, N0) with the rounding `rounding_of(config, weight)` (`RoundingSettings`)."""
    def from_rows(weight, analog, quantized, alphabet, config):
        rounding = rounding_of(config, weight)
        order, weight, analog, quantized = rows_in_order(config.column_order, weight, analog, quantized)
        if config.engine == "columns":
            walked = gpfq_columns(weight, analog, quantized, alphabet, torch.float32, rounding.rule or nearest_rounding,
                                  first_column="code2022" if rounding.code2022 else "paper")
        elif config.engine == "residual":
            walked = gpfq_residual(weight, analog, quantized, alphabet, rounding=rounding)
        else:  # 'gram' (the rows summed into Grams there) or 'auto'
            walked = gpfq_blocked(weight, analog, quantized, alphabet, form=config.engine, rounding=rounding)
        return restore_columns(walked, order)
    return from_rows


def walk_from_statistics(rounding_of):
    """A GPFQ-family rule on GramStatistics: the Gram form with the rounding `rounding_of(config, weight)`."""
    def from_statistics(weight, statistics, alphabet, config):
        order, weight, cross, gram = gram_in_order(config.column_order, weight, statistics.cross,
                                                   statistics.quantized_gram)
        return restore_columns(gpfq_gram(weight, cross, gram, alphabet, rounding=rounding_of(config, weight)), order)
    return from_statistics


# Each method's rounding_of(config, weight): its `RoundingSettings` for the layer. Only GPFQ itself offers the 2022
# first-column rule; the variants walk with the paper's.
def _gpfq_rounding(config, weight):
    return RoundingSettings(code2022=config.gpfq_first_column == "code2022")


def _spfq_rounding(config, weight):
    return RoundingSettings(spfq_rounding(weight.shape, config.seed))


def _sparse_rounding(config, weight):
    return RoundingSettings(ThresholdedRounding(config.sparsity_threshold, config.thresholding))


def _msq_from_rows(weight, analog, quantized, alphabet, config):
    return msq(weight, alphabet)


def _msq_from_statistics(weight, statistics, alphabet, config):
    return msq(weight, alphabet)


def _gpfq_options(config) -> str:
    first = "first column code2022" if config.gpfq_first_column == "code2022" else ""
    return ", ".join(part for part in (first, order_option(config)[2:]) if part)


GPFQ = Method("gpfq", walk_from_rows(_gpfq_rounding), walk_from_statistics(_gpfq_rounding), gpfq_family=True,
              describe=_gpfq_options)
SPFQ = Method("spfq", walk_from_rows(_spfq_rounding), walk_from_statistics(_spfq_rounding), gpfq_family=True,
              describe=lambda config: f"stochastic rounding{order_option(config)}")
SPARSE_GPFQ = Method(
    "sparse_gpfq", walk_from_rows(_sparse_rounding), walk_from_statistics(_sparse_rounding), gpfq_family=True,
    describe=lambda config: f"{config.thresholding} threshold {config.sparsity_threshold}{order_option(config)}")
# MSQ needs no rows; its rule on sums serves the relative error when the rows are spread over ranks.
MSQ = Method("msq", _msq_from_rows, _msq_from_statistics, needs_rows=False)
