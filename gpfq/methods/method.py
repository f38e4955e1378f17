"""`Method`: one quantization method as the network pipeline sees it, its layer rule and what that rule needs.

The pipeline never checks a method's name: it looks the method up once (`gpfq.methods.METHODS[config.method]`)
and asks the object which rows or sums to collect, how the layer is computed and what to log.
Shapes: weight (G, N1, N0), rows (G, m, N0), alphabet (L,) or (G, N1, L), Q (G, N1, N0).
"""
from dataclasses import dataclass
from typing import Callable

import torch

from gpfq.methods.gpfq.engine import DEFAULT_ROWS_BUDGET, choose_form, rows_bytes


def no_options(config) -> str:
    """The Method Options text of a method without options."""
    return ""


def order_option(config) -> str:
    """', act-order' when the columns are quantized in act-order (`config.column_order`), else ''."""
    return ", act-order" if config.column_order == "act_order" else ""


@dataclass(frozen=True)
class Method:
    """A layer rule and what it needs.

    from_rows(weight, analog_rows, quantized_rows, alphabet, config) -> Q, from the rows (G, m, N0).
    from_statistics(weight, statistics, alphabet, config) -> Q, from streamed `engine.GramStatistics`
    (X̃ᵀX, X̃ᵀX̃); None when the rule needs the rows themselves.
    needs_rows: False when Q depends on the weights alone (MSQ): rows (or sums) serve only the relative error.
    gpfq_family: walks GPFQ's path with its own rounding, in the engine form 'residual', 'gram' or 'columns'.
    statistics_dtype: of its Gram sums.
    describe(config) -> the Method Options column of the log.
    """
    name: str
    from_rows: Callable
    from_statistics: Callable = None
    needs_rows: bool = True
    gpfq_family: bool = False
    statistics_dtype: torch.dtype = torch.float32
    describe: Callable = no_options

    def form(self, config, rows: int, n_inputs: int, n_neurons: int, n_groups: int,
             rows_budget: float = DEFAULT_ROWS_BUDGET) -> str:
        """How a layer of `rows` rows (G groups of N1 neurons × N0 inputs) is computed: the GPFQ family's
        engine form ('residual', 'gram', 'columns'); 'gram' (from streamed sums) for a rule that has one, with
        engine 'gram' or when the rows exceed `rows_budget` bytes; else the method's name."""
        if self.gpfq_family:
            if config.engine == "columns":
                return "columns"
            return choose_form(config.engine, rows, n_inputs, n_neurons, n_groups, rows_budget)
        # without rows to hold (MSQ) there is nothing to save by streaming
        if self.from_statistics is None or not self.needs_rows:
            return self.name
        streamed = config.engine == "gram" or rows_bytes(rows, n_inputs, n_groups) > rows_budget
        return "gram" if streamed else self.name
