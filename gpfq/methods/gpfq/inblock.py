"""GPFQ's in-block sequential step: round a block's columns in order, each correcting the later ones.

For a block of B columns (docs/engine.md, `gpfq.methods.gpfq.engine`), given per group the arguments' numerators
a (B, N1), which already hold everything from the columns before the block, and the block's Gram
H = X̃_bᵀX̃_b (B, B), with d_t = H[t, t]:

    q_t = Q_A(a_t / d_t − Σ_{j<t} (H[j, t] / d_t) q_j),   t = 0 … B−1   (argument 0 if d_t = 0)

for every neuron, Q_A being nearest rounding or one of GPFQ's other rules (`gpfq.methods.rounding`: sparse
GPFQ's thresholding, SPFQ's stochastic rounding). The engine also gives every block its weights w_b (B, N1) and
the diagonal c of X̃_bᵀX_b; they are read only under the flag `code2022` (the 2022 code's shortcut, specified in
`gpfq.methods.gpfq.reference`): the past part of the numerator, p_t = a_t − c_t w_t − Σ_{j<t} H[j, t] q_j =
<X̃_t, u_{t-1}>, decides, and where |p_t| < 1e-10 the argument is w_t itself. Two implementations of the same
arithmetic (corrections subtracted in the order j = 0, 1, …):
- `round_block_torch`: a few tensor operations per column; any device.
- the compiled kernel (numba): one call per block; CPU only. Per column the torch version pays
  ~25 µs of operator dispatch, most of the engine's time on a CPU; this one pays none. Its rounding mirrors the
  vectorized definitions of `gpfq.methods.rounding` line for line (tests/test_inblock.py checks that it equals
  them on ties, at the alphabet's edges and beyond, for every alphabet kind).
`block_rounder` prepares one of them for a layer (the compiled one for CPU tensors when numba is installed) as a
`BlockStep`: the engine calls its `kernel` on its `arguments(…)` for each block itself, so that the path from
`gpfq.quantize` to the kernel stays five frames (docs/design.md).
"""
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from gpfq.methods.gpfq.reference import SHORTCUT_TOLERANCE
from gpfq.methods.rounding import (StochasticRounding, ThresholdedRounding, alphabet_midpoints, largest_level,
                                   nearest_rounding, round_with_midpoints)
from gpfq.threads import single_thread

try:  # numba is in requirements.txt; without it the engine still works, at torch-dispatch speed
    import numba
except ImportError:  # pragma: no cover - exercised only where numba is missing
    numba = None

# Up to this many midpoints the index is counted with one branch-free comparison per midpoint, which
# vectorizes over neurons; larger alphabets (8 bits and up) use a binary search per entry.
LINEAR_SEARCH_MAX_MIDPOINTS = 64
# The rules the compiled kernel knows; any other vectorized rule runs in the torch version.
NEAREST, THRESHOLD, STOCHASTIC = 0, 1, 2


@dataclass(frozen=True)
class RoundingSettings:
    """How the engine rounds column t's argument.

    rule: None (nearest, GPFQ) or a vectorized rule of `gpfq.methods.rounding` (SPFQ's stochastic rounding,
    sparse GPFQ's thresholding). code2022: the 2022 code's first-column shortcut (`gpfq.methods.gpfq.reference`),
    one flag of the kernel. compiled: None picks the numba kernel for CPU tensors when numba is installed and knows
    the rule; True / False force one implementation.
    """
    rule: Optional[Callable] = None
    code2022: bool = False
    compiled: Optional[bool] = None


def block_coupling(quantized_gram):
    """From H_bb (G, B, B): 1/d (G, B), 0 for empty columns, and coupling (G, B, B) = H[j, t]/d_t for t > j."""
    norms2 = torch.diagonal(quantized_gram, dim1=1, dim2=2)
    # ||X̃_t|| = 0: the argument is 0 (its numerator is 0 too), so scale by 0 rather than 1/0.
    inverse = torch.where(norms2 > 0, 1.0 / torch.where(norms2 > 0, norms2, torch.ones_like(norms2)),
                          torch.zeros_like(norms2))
    # Row j of triu(H, 1) holds <X̃_j, X̃_t> for t > j; column t is scaled by 1/d_t.
    return inverse, torch.triu(quantized_gram, diagonal=1) * inverse.unsqueeze(1)


def round_block_torch(numerators, quantized_gram, alphabet, midpoints=None, rounding=None, start=0, weights=None,
                      cross_diagonal=None):
    """numerators (G, B, N1), quantized_gram (G, B, B), alphabet (L,) or (G, N1, L) -> q (G, B, N1).

    Three tensor operations per column (search, gather, update); `midpoints`: the alphabet's, if at hand.
    `rounding`: a vectorized rule rule(argument (G, N1), alphabet, column) (`gpfq.methods.rounding`) in place of
    nearest rounding; the block's first column is column `start` of the layer.
    weights (G, B, N1) and cross_diagonal (G, B) given: the 2022 code's shortcut, the kernel's flag `code2022`
    (module docstring).
    """
    midpoints = alphabet_midpoints(alphabet) if midpoints is None else midpoints
    with single_thread():
        inverse, coupling = block_coupling(quantized_gram)
        arguments = (numerators * inverse.unsqueeze(2)).transpose(0, 1).contiguous()  # (B, G, N1)
        coupling = coupling.permute(1, 2, 0).unsqueeze(-1)  # (B, B, G, 1): [j, t] broadcast over neurons
        code2022 = weights is not None
        if code2022:
            # p_t = a_t − c_t w_t, then − H[j, t] q_j for each earlier column j (the kernel's order)
            pasts = (numerators - cross_diagonal.unsqueeze(2) * weights).transpose(0, 1).contiguous()
            weights_t = weights.transpose(0, 1)
            gram_t = quantized_gram.permute(1, 2, 0).unsqueeze(-1)  # (B, B, G, 1): H[j, t]
        rounded = []
        for t in range(arguments.shape[0]):
            argument = arguments[t]
            if code2022:
                argument = torch.where(pasts[t].abs() < SHORTCUT_TOLERANCE, weights_t[t], argument)
            q = (round_with_midpoints(argument, alphabet, midpoints) if rounding is None
                 else rounding(argument, alphabet, start + t))
            rounded.append(q)
            if t + 1 < arguments.shape[0]:
                arguments[t + 1:].addcmul_(coupling[t, t + 1:], q, value=-1.0)
                if code2022:
                    pasts[t + 1:].addcmul_(gram_t[t, t + 1:], q, value=-1.0)
        return torch.stack(rounded, dim=1)


def _compiled(function):
    """numba-compile `function`, cached on disk (gpfq/__pycache__, else numba's user-wide cache) when
    one of those is writable; otherwise compiled anew in each process."""
    try:
        return numba.njit(cache=True, nogil=True)(function)
    except RuntimeError:  # "cannot cache function …: no locator available"
        return numba.njit(nogil=True)(function)


if numba is not None:
    @_compiled
    def _round_block_kernel(numerators, quantized_gram, levels, midpoints, rule, thresholds, soft, uniforms,
                            code2022, weights, cross_diagonal, rounded):
        """Left-looking: row t takes its corrections from the rows already rounded, then is rounded.

        numerators and rounded (G, B, N1); quantized_gram (G, B, B); levels (L, R), midpoints (L−1, R)
        with R = 1 (one alphabet) or G·N1 (one per neuron, column g·N1 + n). rule: NEAREST, THRESHOLD
        (thresholds (R,): λ per alphabet, soft or hard, then nearest) or STOCHASTIC (uniforms (G, B, N1)).
        code2022: the 2022 code's first-column rule, with weights (G, B, N1) and cross_diagonal (G, B).
        Writes q into `rounded` and returns it. The rounding mirrors `gpfq.methods.rounding` (stochastic_round,
        threshold, round_with_midpoints), comparison for comparison; tests/test_inblock.py holds them equal.
        """
        n_groups, n_columns, n_neurons = numerators.shape
        n_levels = levels.shape[0]
        n_midpoints = midpoints.shape[0]
        per_neuron = levels.shape[1] > 1
        zero = numerators.dtype.type(0)
        one = numerators.dtype.type(1)
        row = np.empty(n_neurons, dtype=numerators.dtype)
        index = np.empty(n_neurons, dtype=np.int64)
        for g in range(n_groups):
            offset = g * n_neurons if per_neuron else 0
            for t in range(n_columns):
                norm2 = quantized_gram[g, t, t]
                inverse = one / norm2 if norm2 > zero else zero
                for n in range(n_neurons):
                    row[n] = numerators[g, t, n] * inverse
                for j in range(t):
                    coupling = quantized_gram[g, j, t] * inverse
                    for n in range(n_neurons):
                        row[n] -= coupling * rounded[g, j, n]
                if code2022:
                    for n in range(n_neurons):
                        past = numerators[g, t, n] - cross_diagonal[g, t] * weights[g, t, n]
                        for j in range(t):
                            past -= quantized_gram[g, j, t] * rounded[g, j, n]
                        if abs(past) < SHORTCUT_TOLERANCE:
                            row[n] = weights[g, t, n]
                if rule == STOCHASTIC:
                    # as rounding.stochastic_round: clip to [min A, max A], lower = last level ≤ z (at most
                    # the last but one), up with probability (z − lower)/(upper − lower)
                    for n in range(n_neurons):
                        column = offset + n if per_neuron else 0
                        if n_levels == 1:
                            rounded[g, t, n] = levels[0, column]
                            continue
                        value = min(max(row[n], levels[0, column]), levels[n_levels - 1, column])
                        count = 0
                        for k in range(n_levels):
                            count += levels[k, column] <= value
                        lower_index = min(max(count - 1, 0), n_levels - 2)
                        lower = levels[lower_index, column]
                        upper = levels[lower_index + 1, column]
                        gap = upper - lower
                        up_probability = (value - lower) / gap if gap > zero else zero
                        rounded[g, t, n] = upper if uniforms[g, t, n] < up_probability else lower
                    continue
                if rule == THRESHOLD:
                    # as rounding.threshold: soft sign(z)·max(|z| − λ, 0), hard z·1[|z| > λ]
                    for n in range(n_neurons):
                        bound = thresholds[offset + n if per_neuron else 0]
                        value = row[n]
                        if soft:
                            shrunk = abs(value) - bound
                            shrunk = shrunk if shrunk > zero else zero
                            sign = one if value > zero else (-one if value < zero else zero)
                            row[n] = sign * shrunk
                        elif not abs(value) > bound:
                            row[n] = zero
                # index = number of midpoints strictly below the value: ties go to the smaller level,
                # as torch.bucketize(…, right=False) in `rounding.round_with_midpoints`.
                if n_midpoints <= LINEAR_SEARCH_MAX_MIDPOINTS:
                    index[:] = 0
                    for k in range(n_midpoints):
                        if per_neuron:
                            for n in range(n_neurons):
                                index[n] += midpoints[k, offset + n] < row[n]
                        else:
                            bound = midpoints[k, 0]
                            for n in range(n_neurons):
                                index[n] += bound < row[n]
                else:
                    for n in range(n_neurons):
                        column = offset + n if per_neuron else 0
                        low, high = 0, n_midpoints
                        while low < high:
                            middle = (low + high) // 2
                            if midpoints[middle, column] < row[n]:
                                low = middle + 1
                            else:
                                high = middle
                        index[n] = low
                for n in range(n_neurons):
                    rounded[g, t, n] = levels[index[n], offset + n if per_neuron else 0]
        return rounded


def compiled_available() -> bool:
    """Whether the compiled in-block kernel can run here (numba importable)."""
    return numba is not None


def compiled_rule(rounding, alphabet):
    """(rule, thresholds, soft) of the compiled kernel for `rounding` (None: nearest), or None if it does not
    know the rule."""
    if rounding is None:
        return NEAREST, None, False
    if isinstance(rounding, ThresholdedRounding):
        # λ as ThresholdedRounding computes it, in the compute dtype: one per alphabet
        thresholds = (rounding.relative_threshold * largest_level(alphabet)).reshape(-1)
        return THRESHOLD, thresholds, rounding.kind == "soft"
    if isinstance(rounding, StochasticRounding):
        return STOCHASTIC, None, False
    return None


@dataclass(frozen=True)
class BlockStep:
    """One layer's in-block step, from `block_rounder`: for a block, q (G, B, N1) =
    torch.as_tensor(kernel(*arguments(numerators, quantized_gram, start, weights, cross_diagonal))).

    kernel: the compiled `_round_block_kernel` (it returns a numpy array) or `round_block_torch`; arguments(…)
    puts the block's tensors in the kernel's form. Calling the step does both (the engine does them itself).
    """
    kernel: Callable
    arguments: Callable

    def __call__(self, numerators, quantized_gram, start=0, weights=None, cross_diagonal=None):
        """q (G, B, N1) of one block, as a tensor."""
        return torch.as_tensor(self.kernel(*self.arguments(numerators, quantized_gram, start, weights,
                                                           cross_diagonal)))


def block_rounder(alphabet, n_groups, n_neurons, settings=RoundingSettings()) -> BlockStep:
    """The in-block step for one layer (`BlockStep`): (numerators (G, B, N1), H_bb (G, B, B), start, weights,
    cross_diagonal) -> q (G, B, N1), `start` being the block's first column in the layer; weights (G, B, N1)
    and cross_diagonal (G, B) (the block's w and diag X̃_bᵀX_b) are read only with `settings.code2022`.

    alphabet (L,) or (G, N1, L), already in the compute dtype and on the device. settings: `RoundingSettings`.
    """
    code2022, compiled = settings.code2022, settings.compiled
    rounding = None if settings.rule is nearest_rounding else settings.rule
    rule = compiled_rule(rounding, alphabet)
    if compiled is None:
        compiled = numba is not None and alphabet.device.type == "cpu" and rule is not None
    if not compiled:
        midpoints = alphabet_midpoints(alphabet)

        def torch_arguments(numerators, quantized_gram, start=0, weights=None, cross_diagonal=None):
            return (numerators, quantized_gram, alphabet, midpoints, rounding, start, weights if code2022 else None,
                    cross_diagonal if code2022 else None)
        return BlockStep(round_block_torch, torch_arguments)
    if numba is None:
        raise RuntimeError("the compiled in-block kernel needs numba (pip install numba)")
    if alphabet.device.type != "cpu":
        raise ValueError("the compiled in-block kernel runs on the CPU; use compiled=False on other devices")
    if rule is None:
        raise ValueError(f"the compiled in-block kernel does not know the rounding rule {rounding!r}; "
                         f"use compiled=False")
    kind, thresholds, soft = rule
    levels = alphabet.reshape(1, -1) if alphabet.dim() == 1 else alphabet.reshape(n_groups * n_neurons, -1)
    midpoints = alphabet_midpoints(levels)  # the thresholds of round_to_alphabet, in the same dtype
    levels, midpoints = levels.t().contiguous().numpy(), midpoints.t().contiguous().numpy()  # (L, R), (L−1, R)
    thresholds = (np.zeros(1, dtype=levels.dtype) if thresholds is None
                  else thresholds.to(alphabet.dtype).contiguous().numpy())
    # SPFQ's uniforms (G, N1, N0) laid out once as (G, N0, N1), so a block's are rows start … stop
    uniforms_t = (rounding.uniforms.to(alphabet.dtype).transpose(1, 2).contiguous() if kind == STOCHASTIC
                  else None)
    no_uniforms = np.zeros((1, 1, 1), dtype=levels.dtype)
    no_weights, no_diagonal = np.zeros((1, 1, 1), dtype=levels.dtype), np.zeros((1, 1), dtype=levels.dtype)

    def compiled_arguments(numerators, quantized_gram, start=0, weights=None, cross_diagonal=None):
        rounded = torch.empty(numerators.shape, dtype=numerators.dtype)
        uniforms = no_uniforms
        if uniforms_t is not None:
            uniforms = uniforms_t[:, start:start + numerators.shape[1]].contiguous().numpy()
        block_weights, diagonal = no_weights, no_diagonal
        if code2022:
            block_weights = weights.to(numerators.dtype).contiguous().numpy()
            diagonal = cross_diagonal.to(numerators.dtype).contiguous().numpy()
        return (numerators.contiguous().numpy(), quantized_gram.contiguous().numpy(), levels, midpoints, kind,
                thresholds, soft, uniforms, code2022, block_weights, diagonal, rounded.numpy())

    # the module's kernel as it is now: tests/test_api.py replaces it to count the frames above it
    return BlockStep(_round_block_kernel, compiled_arguments)
