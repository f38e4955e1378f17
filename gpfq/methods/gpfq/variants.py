"""The GPFQ family's layer rules with other rounding rules: stochastic GPFQ (SPFQ) and sparse GPFQ, and the
`Method` objects of GPFQ, SPFQ, sparse GPFQ and their baseline MSQ (round to the nearest level).

The walk is GPFQ's (`reference.gpfq_columns` or the blocked engine); only the rounding rule of
`gpfq.methods.rounding` changes. Shapes as `reference.gpfq_columns`: weight (G, N1, N0), rows (G, m, N0),
alphabet (L,) or (G, N1, L) -> Q (G, N1, N0).
"""
import torch

from gpfq.methods.gpfq.column_order import gram_rule_in_order, rows_rule_in_order
from gpfq.methods.gpfq.engine import gpfq_blocked, gpfq_gram
from gpfq.methods.gpfq.reference import gpfq_columns, msq
from gpfq.methods.method import Method, order_option
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


# The methods' layer rules under a QuantConfig. From rows, config.engine is the layer's form
# (`Method.form`); from sums, the form is 'gram'.

def _gpfq_from_rows(weight, analog, quantized, alphabet, config):
    def rule(w, x, xq):
        return gpfq_walk(w, x, xq, alphabet, engine=config.engine, first_column=config.gpfq_first_column)
    return rows_rule_in_order(rule, weight, analog, quantized, config.column_order)


def _spfq_from_rows(weight, analog, quantized, alphabet, config):
    return rows_rule_in_order(lambda w, x, xq: spfq(w, x, xq, alphabet, config.seed, engine=config.engine),
                              weight, analog, quantized, config.column_order)


def _sparse_gpfq_from_rows(weight, analog, quantized, alphabet, config):
    return rows_rule_in_order(lambda w, x, xq: sparse_gpfq(w, x, xq, alphabet, config.sparsity_threshold,
                                                           config.thresholding, engine=config.engine),
                              weight, analog, quantized, config.column_order)


def walk_from_statistics(rounding_of, honours_first_column: bool = False):
    """A GPFQ-family rule on GramStatistics: the Gram form with the rounding `rounding_of(config, weight)` (None:
    nearest); only GPFQ itself offers the 2022 first-column rule, the variants walk with the paper's."""
    def rule(weight, statistics, alphabet, config):
        rounding = rounding_of(config, weight)
        first_column = config.gpfq_first_column if honours_first_column else "paper"
        return gram_rule_in_order(lambda w, cross, gram: gpfq_gram(w, cross, gram, alphabet, rounding=rounding,
                                                                   first_column=first_column),
                                  weight, statistics.cross, statistics.quantized_gram, config.column_order)
    return rule


def _msq_from_rows(weight, analog, quantized, alphabet, config):
    return msq(weight, alphabet)


def _msq_from_statistics(weight, statistics, alphabet, config):
    return msq(weight, alphabet)


def _gpfq_options(config) -> str:
    first = "first column code2022" if config.gpfq_first_column == "code2022" else ""
    return ", ".join(part for part in (first, order_option(config)[2:]) if part)


GPFQ = Method("gpfq", _gpfq_from_rows, walk_from_statistics(lambda config, weight: None, honours_first_column=True),
              gpfq_family=True, describe=_gpfq_options)
SPFQ = Method("spfq", _spfq_from_rows,
              walk_from_statistics(lambda config, weight: spfq_rounding(weight.shape, config.seed)),
              gpfq_family=True, describe=lambda config: f"stochastic rounding{order_option(config)}")
SPARSE_GPFQ = Method(
    "sparse_gpfq", _sparse_gpfq_from_rows,
    walk_from_statistics(lambda config, weight: ThresholdedRounding(config.sparsity_threshold, config.thresholding)),
    gpfq_family=True,
    describe=lambda config: f"{config.thresholding} threshold {config.sparsity_threshold}{order_option(config)}")
# MSQ needs no rows; its rule on sums serves the relative error when the rows are spread over ranks.
MSQ = Method("msq", _msq_from_rows, _msq_from_statistics, needs_rows=False)
