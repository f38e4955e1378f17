"""Blocked GPFQ engine: the per-column rule of `gpfq.methods.gpfq.reference` at matrix-product speed.

Shapes follow `gpfq.methods.gpfq.reference`: weight W (G, N1, N0), analog rows X (G, m, N0),
quantized rows X̃ (G, m, N0), G = groups. For input column t and every neuron w
(docs/engine.md), with d_t = ||X̃_t||²,

    q_t = Q_A( (Σ_{j≤t} <X̃_t, X_j> w_j − Σ_{j<t} <X̃_t, X̃_j> q_j) / d_t )     (0 if d_t = 0)

which is the per-column rule with the residual u_{t-1} expanded. Columns are walked
in blocks of B (GPTQ's "lazy batch" update): everything a block needs from earlier
blocks arrives in one matrix product, and inside the block only the B×B coupling
<X̃_t, X̃_j>/d_t (s ≤ j < t) is applied column by column. Two ways to get the
contribution of earlier blocks, both exact up to floating-point order:

- residual form: keep U = X Wᵀ − X̃ Qᵀ over the columns done (m × N1 per group);
  the block needs X̃_bᵀ U. Cost ≈ 3·m·N0·N1 (+ 2·m·N0·B for the in-block Grams).
- Gram form: from G = X̃ᵀX and H = X̃ᵀX̃ (N0 × N0, summed over calibration chunks,
  see `GramStatistics`); the block needs G[b, ≤t] Wᵀ − H[b, <s] Qᵀ.
  Cost ≈ 2·m·N0² (the Grams) + N1·N0²; memory independent of m.

`gpfq_gram_columns` is the Gram form unblocked, column by column in float64, each line beside the paper's term
it computes; the blocked forms are tested against it (tests/test_engine.py). Every form takes its rounding as one
`RoundingSettings` (the rule, the 2022 first-column flag, compiled or not).

`choose_form` picks the one with fewer predicted seconds (`predicted_seconds`: a cost model fitted to measured
times, docs/engine.md) per layer, or the Gram form when the rows would not fit in memory. The in-block step is `gpfq.methods.gpfq.inblock` (compiled on the CPU); it rounds with
the midpoints of `round_to_alphabet`, so a 1-D alphabet (L,) and per-neuron alphabets
(G, N1, L) both work, and takes the other rounding rules of `gpfq.methods.rounding` (`rounding=`).
"""
import contextlib
import math

import torch

from gpfq.methods.gpfq.inblock import RoundingSettings, block_rounder
from gpfq.methods.gpfq.reference import SHORTCUT_TOLERANCE
from gpfq.methods.rounding import nearest_rounding
from gpfq.threads import single_thread

FORMS = ("residual", "gram")
ENGINES = ("auto",) + FORMS + ("columns",)  # "columns": the per-column loop `gpfq_columns`
# Rows per float32 product when `gpfq_blocked` sums rows it is given into float64 Grams (about what one
# stream chunk of 256 images gives a conv layer).
GRAM_CHUNK_ROWS = 2 ** 14
DEFAULT_ROWS_BUDGET = 2 ** 30  # bytes of X, X̃ rows the residual form may hold before "auto" streams instead
# A block's products use all threads only when its largest has this many multiply-adds (≈ 25 µs on one
# core). On an idle 2-core machine two threads already pay from 1.3 M (33 → 25 µs) and give 1.6–1.9× from
# 25 M; below the threshold a thread team's start-up is most of the product. (On a machine shared with
# other jobs every parallel product may wait for a time slice, but that is not the machine to time on.)
PARALLEL_MIN_MACS = 2 ** 20


def block_threads(largest_product):
    """All threads for a block whose largest product (multiply-adds) is big enough, else one."""
    return contextlib.nullcontext() if largest_product >= PARALLEL_MIN_MACS else single_thread()


def _prepare_alphabet(alphabet, n_groups, n_neurons, dtype, device):
    """The alphabet in the compute dtype, as (L,) or (G, N1, L); reject other shapes early."""
    levels = torch.as_tensor(alphabet).to(device=device, dtype=dtype)
    if levels.dim() == 1:
        return levels
    if levels.dim() == 3 and levels.shape[:2] == (n_groups, n_neurons):
        return levels.contiguous()
    if levels.dim() == 2 and levels.shape[0] == n_groups * n_neurons:  # one row per output channel
        return levels.reshape(n_groups, n_neurons, -1).contiguous()
    raise ValueError(f"alphabet of shape {tuple(levels.shape)} fits neither one alphabet (L,) nor one per "
                     f"neuron ({n_groups}, {n_neurons}, L)")


def default_block_size(form: str, n_neurons: int) -> int:
    """Columns per block. Residual form: 64. Its in-block Grams cost 2·m·N0·B on top of 3·m·N0·N1, while
    B < 64 makes the products skinny; measured best or within 5 % of best for N1 = 16 … 512 (2 cores).
    Gram form: 128 (no in-block Grams; 64 … 128 measured alike). `n_neurons` is kept for other rules."""
    del n_neurons
    return 128 if form == "gram" else 64


def gpfq_residual(weight, analog_input, quantized_input, alphabet, block_size=None, dtype=torch.float32,
                  rounding=RoundingSettings()):
    """Blocked GPFQ, residual form. weight (G, N1, N0), rows (G, m, N0), alphabet (L,) or (G, N1, L).

    Returns Q (G, N1, N0) in weight's dtype. Keeps U = X Wᵀ − X̃ Qᵀ (G, m, N1) over done columns.
    `rounding` (`RoundingSettings`): the rule (None: nearest; SPFQ's, sparse GPFQ's), the 2022 first-column
    flag, and whether the in-block step is the compiled kernel (None: on the CPU).
    """
    # The rows stay as given (any dtype, a strided view per group): each block's columns are converted while
    # they are copied into the workspace, so no whole-layer copy of X, X̃ is made.
    X = analog_input.detach()
    Xq = quantized_input.detach()
    n_groups, n_neurons, n_inputs = weight.shape
    n_rows = X.shape[1]
    Wt = weight.detach().to(dtype).transpose(1, 2).contiguous()  # Wᵀ (G, N0, N1)
    step = block_rounder(_prepare_alphabet(alphabet, n_groups, n_neurons, dtype, Wt.device), n_groups, n_neurons,
                         rounding)
    block_size = min(block_size or default_block_size("residual", n_neurons), n_inputs)
    # Workspace [U | X_b | X̃_b] (G, m, N1 + 2B): one product X̃_bᵀ[U | X_b | X̃_b] gives the block's
    # projection X̃_bᵀU and both in-block Grams, and one product [X_b | X̃_b][W_b | −Q_b]ᵀ updates U.
    # Only U starts at zero; the [X_b | X̃_b] columns are written by every block before they are read.
    workspace = torch.empty(n_groups, n_rows, n_neurons + 2 * block_size, dtype=dtype, device=Wt.device)
    residual = workspace[:, :, :n_neurons]
    residual.zero_()
    Qt = torch.empty(n_groups, n_inputs, n_neurons, dtype=dtype, device=Wt.device)  # Qᵀ
    coefficients = torch.empty(n_groups, 2 * block_size, n_neurons, dtype=dtype, device=Wt.device)
    for start in range(0, n_inputs, block_size):
        stop = min(start + block_size, n_inputs)
        width = stop - start
        rows = workspace[:, :, n_neurons:n_neurons + 2 * width]  # [X_b | X̃_b] (G, m, 2B)
        with block_threads(n_groups * n_rows * width * (n_neurons + 2 * width)):
            rows[:, :, :width] = X[:, :, start:stop]
            rows[:, :, width:] = Xq[:, :, start:stop]
            products = torch.bmm(rows[:, :, width:].transpose(1, 2), workspace[:, :, :n_neurons + 2 * width])
            with single_thread():
                projection = products[:, :, :n_neurons]  # X̃_bᵀ U (G, B, N1)
                cross = products[:, :, n_neurons:n_neurons + width]  # X̃_bᵀ X_b (G, B, B)
                # + Σ_{s≤j≤t} <X̃_t, X_j> w_j: the lower triangle of X̃_bᵀX_b, diagonal included.
                numerators = torch.baddbmm(projection, torch.tril(cross), Wt[:, start:stop])
                # the kernel itself, no wrapper between (the form's next frame); the compiled one returns numpy.
                # w_b and diag X̃_bᵀX_b (views) are read only under the 2022 rule, to tell <X̃_t, u_{t-1}> apart.
                Qt[:, start:stop] = torch.as_tensor(step.kernel(*step.arguments(
                    numerators, products[:, :, n_neurons + width:], start, Wt[:, start:stop],
                    torch.diagonal(cross, dim1=1, dim2=2))))
                block_coefficients = coefficients[:, :2 * width]  # [W_b | −Q_b]ᵀ (G, 2B, N1)
                block_coefficients[:, :width] = Wt[:, start:stop]
                torch.neg(Qt[:, start:stop], out=block_coefficients[:, width:])
            residual.baddbmm_(rows, block_coefficients)  # U += X_b W_bᵀ − X̃_b Q_bᵀ
    return Qt.transpose(1, 2).to(weight.dtype)


def gpfq_gram(weight, cross, quantized_gram, alphabet, block_size=None, dtype=torch.float32,
              rounding=RoundingSettings()):
    """Blocked GPFQ, Gram form. weight (G, N1, N0); cross = X̃ᵀX and quantized_gram = X̃ᵀX̃ (G, N0, N0);
    alphabet (L,) or (G, N1, L). Returns Q (G, N1, N0) in weight's dtype. Needs no rows.
    `rounding`: as `gpfq_residual`. `gpfq_gram_columns` is the same form unblocked, term by term the paper's.
    """
    n_groups, n_neurons, n_inputs = weight.shape
    Wt = weight.detach().to(dtype).transpose(1, 2).contiguous()  # (G, N0, N1)
    step = block_rounder(_prepare_alphabet(alphabet, n_groups, n_neurons, dtype, Wt.device), n_groups, n_neurons,
                         rounding)
    block_size = block_size or default_block_size("gram", n_neurons)
    lower_cross = torch.tril(cross.to(dtype))  # row t: <X̃_t, X_j> for j ≤ t
    H = quantized_gram.to(dtype)
    Qt = torch.empty(n_groups, n_inputs, n_neurons, dtype=dtype, device=Wt.device)  # rows < start are written
    for start in range(0, n_inputs, block_size):
        stop = min(start + block_size, n_inputs)
        with block_threads(n_groups * (stop - start) * stop * n_neurons):
            # Σ_{j≤t} G[t, j] w_j − Σ_{j<s} H[t, j] q_j for the block's rows t; the block's own q's come later.
            numerators = torch.bmm(lower_cross[:, start:stop, :stop], Wt[:, :stop])
            if start > 0:
                numerators.baddbmm_(H[:, start:stop, :start], Qt[:, :start], alpha=-1.0)
            with single_thread():
                # as in `gpfq_residual`: the kernel called here, w_b and diag X̃_bᵀX_b for the 2022 rule
                Qt[:, start:stop] = torch.as_tensor(step.kernel(*step.arguments(
                    numerators, H[:, start:stop, start:stop], start, Wt[:, start:stop],
                    torch.diagonal(lower_cross[:, start:stop, start:stop], dim1=1, dim2=2))))
    return Qt.transpose(1, 2).to(weight.dtype)


def gpfq_gram_columns(weight, cross, quantized_gram, alphabet, rounding=RoundingSettings()):
    """GPFQ from the Grams, unblocked, in float64: the paper's rule with u_{t-1} expanded, term by term.

    Shapes as `gpfq_gram` (C = cross = X̃ᵀX, H = quantized_gram = X̃ᵀX̃); `rounding.rule` and `rounding.code2022`
    as there (`compiled` does not apply). The blocked forms are tested against it (tests/test_engine.py).
    """
    W, C, H = weight.detach().double(), cross.double(), quantized_gram.double()
    rule, Q = rounding.rule or nearest_rounding, torch.zeros_like(W)  # W, Q (G, N1, N0)
    for t in range(W.shape[2]):
        d = H[:, t, t, None]  # ||X̃_t||²  (G, 1)
        # <X̃_t, u_{t-1}> = Σ_{j<t} w_j <X̃_t, X_j> − q_j <X̃_t, X̃_j>  (G, N1)
        past = (W[:, :, :t] @ C[:, t, :t, None] - Q[:, :, :t] @ H[:, t, :t, None]).squeeze(2)
        # <X̃_t, u_{t-1} + w_t X_t> / ||X̃_t||²  (0 if ||X̃_t|| = 0)
        argument = torch.where(d > 0, (past + W[:, :, t] * C[:, t, t, None]) / d, 0.0)
        if rounding.code2022:  # the 2022 code: Q_A(w_t) where |<X̃_t, u_{t-1}>| < 1e-10
            argument = torch.where(past.abs() < SHORTCUT_TOLERANCE, W[:, :, t], argument)
        Q[:, :, t] = rule(argument, alphabet, t)  # q_t = Q_A(argument)
    return Q.to(weight.dtype)


# ---------------------------------------------------------------- streamed statistics
class GramStatistics:
    """Running sums over one layer's calibration rows, per group; memory independent of m.

    cross (G, N0, N0) = X̃ᵀX, quantized_gram (G, N0, N0) = X̃ᵀX̃, analog_sum / quantized_sum
    (G, N0) = column sums of X / X̃, analog_square_sum = ||X||²_F, rows = m, and, when `weight` (G, N1, N0) is given,
    analog_output_norm2 = ||X Wᵀ||²_F, so the layer's relative error needs no rows.
    Each chunk's products run in `dtype`; the sums are kept in `accumulate_dtype`.
    """

    def __init__(self, n_groups, n_inputs, weight=None, dtype=torch.float32, accumulate_dtype=torch.float64,
                 device="cpu"):
        self.dtype = dtype
        self.weight = None if weight is None else weight.detach().to(device=device, dtype=dtype)
        shape = (n_groups, n_inputs, n_inputs)
        self.cross = torch.zeros(shape, dtype=accumulate_dtype, device=device)
        self.quantized_gram = torch.zeros(shape, dtype=accumulate_dtype, device=device)
        self.analog_sum = torch.zeros(n_groups, n_inputs, dtype=accumulate_dtype, device=device)
        self.quantized_sum = torch.zeros(n_groups, n_inputs, dtype=accumulate_dtype, device=device)
        self.analog_square_sum = torch.zeros((), dtype=accumulate_dtype, device=device)
        self.analog_output_norm2 = torch.zeros((), dtype=accumulate_dtype, device=device)
        self.rows = 0

    def add(self, analog_rows, quantized_rows):
        """Add one chunk of rows, each (G, c, N0)."""
        X = analog_rows.to(self.dtype)
        Xq = quantized_rows.to(self.dtype)
        Xq_t = Xq.transpose(1, 2)
        self.cross += torch.bmm(Xq_t, X)
        self.quantized_gram += torch.bmm(Xq_t, Xq)
        X64 = X.double()  # exact sums of float32 rows: all-equal rows are told apart from nearly equal ones
        self.analog_sum += X64.sum(dim=1)
        self.quantized_sum += Xq.sum(dim=1)
        # squared in place only when X64 is a copy of its own: float64 rows are X itself (and maybe the caller's)
        self.analog_square_sum += (X64.pow_(2) if X.dtype != torch.float64 else X64.pow(2)).sum()
        if self.weight is not None:
            self.analog_output_norm2 += torch.bmm(X, self.weight.transpose(1, 2)).double().pow_(2).sum()
        self.rows += X.shape[1]
        return self

    def relative_error(self, weight, quantized_weight):
        """||X Wᵀ − X̃ Qᵀ||_F / ||X Wᵀ||_F from the sums (needs `weight` at construction)."""
        if self.weight is None:
            raise ValueError("GramStatistics was built without the layer weight; ||X Wᵀ|| is unknown")
        W = weight.detach().to(self.cross.dtype)
        Q = quantized_weight.detach().to(self.cross.dtype)
        # ||XWᵀ − X̃Qᵀ||² = ||XWᵀ||² − 2 Σ W ⊙ (Q X̃ᵀX) + Σ Q ⊙ (Q X̃ᵀX̃)
        cross_term = (torch.bmm(Q, self.cross) * W).sum()
        quantized_term = (torch.bmm(Q, self.quantized_gram) * Q).sum()
        reference2 = self.analog_output_norm2
        gap2 = (reference2 - 2 * cross_term + quantized_term).clamp_min(0)
        return float(gap2.sqrt() / reference2.sqrt()) if reference2 > 0 else math.nan  # 0/0: undefined


# ---------------------------------------------------------------- choosing a form
def predicted_cost(form, rows, n_inputs, n_neurons, n_groups=1, block_size=None):
    """Multiply-adds of one layer's matrix products in `form` (the dominant terms; both alphabet kinds)."""
    if form == "residual":
        block_size = block_size or default_block_size("residual", n_neurons)
        return n_groups * rows * n_inputs * (3 * n_neurons + 2 * min(block_size, n_inputs))
    if form == "gram":
        return n_groups * (2 * rows * n_inputs ** 2 + n_neurons * n_inputs ** 2)
    raise ValueError(f"form must be one of {FORMS}, got {form!r}")


def cost_terms(form, rows, n_inputs, n_neurons, n_groups=1, chunk_rows=GRAM_CHUNK_ROWS):
    """The counts `predicted_seconds` weighs for one layer in `form`, as {term: count}.

    residual: products = G·m·N0·(3·N1 + 2·B) multiply-adds; rows = G·m·N0, the entries of X, X̃ copied into the
    workspace (memory-bound); inblock = G·N0·B·N1, the in-block step; grouped = G·m·N0 when G > 1 (batched
    products of tiny matrices run at about copy speed).
    gram: sums = 2·G·m·N0² + G·m·N0·N1 multiply-adds (the streamed X̃ᵀX, X̃ᵀX̃ and XWᵀ); rows = G·m·(N0 + N1), the
    float64 sums of each chunk; rule = G·N1·N0², the block products from the sums; grouped as above.
    `chunk_rows` is kept for other models (the fitted one has no per-chunk term).
    """
    del chunk_rows
    block = min(default_block_size(form, n_neurons), n_inputs)
    grouped = n_groups * rows * n_inputs if n_groups > 1 else 0
    if form == "residual":
        return {"products": predicted_cost("residual", rows, n_inputs, n_neurons, n_groups),
                "rows": n_groups * rows * n_inputs, "inblock": n_groups * n_inputs * block * n_neurons,
                "grouped": grouped}
    if form == "gram":
        return {"sums": n_groups * rows * n_inputs * (2 * n_inputs + n_neurons),
                "rows": n_groups * rows * (n_inputs + n_neurons), "rule": n_groups * n_neurons * n_inputs ** 2,
                "grouped": grouped}
    raise ValueError(f"form must be one of {FORMS}, got {form!r}")


# Seconds per count of `cost_terms`, fitted by `benchmarks/bench_layer.py --grid --fit` to two runs on this
# project's 2-core machine, one thread (docs/engine.md). Only the ratio of the two forms' sums decides, so another machine
# needs other constants only where its products and copies differ in relative speed.
FORM_SECONDS = {
    "residual": {"products": 3.97e-11, "rows": 5.6e-09, "inblock": 2.22e-10, "grouped": 1.22e-08},
    "gram": {"sums": 2.91e-11, "rows": 9.73e-09, "rule": 1.11e-10, "grouped": 5.02e-08},
}


def predicted_seconds(form, rows, n_inputs, n_neurons, n_groups=1, chunk_rows=GRAM_CHUNK_ROWS):
    """Seconds of one layer in `form` by the fitted cost model: Σ FORM_SECONDS[form][term] · cost_terms[term]
    (both sums, with their constants, in docs/engine.md). Shapes: m = `rows`, N0 = `n_inputs`, N1 = `n_neurons`."""
    constants = FORM_SECONDS[form] if form in FORM_SECONDS else None
    if constants is None:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    terms = cost_terms(form, rows, n_inputs, n_neurons, n_groups, chunk_rows)
    return sum(constants[term] * count for term, count in terms.items())


def rows_bytes(rows, n_inputs, n_groups=1, element_size=4):
    """Memory of X and X̃ as rows (the residual form needs them all at once)."""
    return 2 * n_groups * rows * n_inputs * element_size


def choose_form(engine, rows, n_inputs, n_neurons, n_groups=1, rows_budget=DEFAULT_ROWS_BUDGET):
    """'residual' or 'gram' for `engine` ('auto': the one `predicted_seconds` finds faster, or 'gram' when the
    rows exceed the budget)."""
    if engine in FORMS:
        return engine
    if engine != "auto":
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if rows_bytes(rows, n_inputs, n_groups) > rows_budget:
        return "gram"
    residual = predicted_seconds("residual", rows, n_inputs, n_neurons, n_groups)
    gram = predicted_seconds("gram", rows, n_inputs, n_neurons, n_groups)
    return "residual" if residual <= gram else "gram"


def gpfq_blocked(weight, analog_input, quantized_input, alphabet, form="auto", block_size=None,
                 dtype=torch.float32, rounding=RoundingSettings()):
    """Blocked GPFQ from rows: the form `choose_form` picks (or the one given). Shapes and `rounding` as
    `gpfq_residual`.

    The Gram form sums the rows GRAM_CHUNK_ROWS at a time into float64 (`GramStatistics`), as a stream sums
    its chunks: one float32 product over every row would lose precision as m grows.
    """
    chunk_rows = GRAM_CHUNK_ROWS
    n_groups, n_neurons, n_inputs = weight.shape
    form = choose_form(form, analog_input.shape[1], n_inputs, n_neurons, n_groups, rows_budget=math.inf)
    if form == "residual":
        return gpfq_residual(weight, analog_input, quantized_input, alphabet, block_size, dtype, rounding)
    statistics = GramStatistics(n_groups, n_inputs, dtype=dtype, device=weight.device)
    for start in range(0, analog_input.shape[1], chunk_rows):
        statistics.add(analog_input[:, start:start + chunk_rows], quantized_input[:, start:start + chunk_rows])
    return gpfq_gram(weight, statistics.cross, statistics.quantized_gram, alphabet, block_size, dtype, rounding)
