"""Rounding rules: how GPFQ's walk maps a column's argument to an alphabet level.

The walk is the same for every method of the GPFQ family; only the map from the argument
z = <X̃_t, u_{t-1} + w_t X_t> / ||X̃_t||² to a level differs:

- nearest (GPFQ): the nearest level, ties to the smaller one.
- stochastic (SPFQ, order 1): z is clipped to [min A, max A]; with a ≤ z ≤ a' the neighbouring
  levels, q = a' with probability (z − a)/(a' − a), else a (unbiased: E q = z). Seeded: the
  uniforms of all (neuron, column) pairs are drawn up front from one generator.
- thresholded (sparse GPFQ): z is thresholded before nearest rounding, soft (L1):
  sign(z)·max(|z| − λ, 0), or hard (L0): z·1[|z| > λ]. λ is relative to the alphabet's largest
  level (C·rad of the layer, or of the channel), so one value means the same on every layer.

A vectorized rule has the signature
    rounding(argument (G, N1), alphabet (L,) or (G, N1, L), column t) -> q (G, N1)
(the per-column loop `reference.gpfq_columns` and the blocked engine take it). These torch functions are the one
vectorized definition of the rounding: nearest (`round_with_midpoints`: the index is the number of midpoints
strictly below the value), stochastic (`stochastic_round`) and thresholded (`threshold`, then nearest). The
compiled in-block kernel (`gpfq.methods.gpfq.inblock._round_block_kernel`) mirrors them line for line, and
tests/test_inblock.py checks kernel == this module on ties, at the alphabet's edges and beyond, for every
alphabet kind. A scalar rule, for the float64 reference `reference.gpfq_reference` (the specification, written
independently of this module), is
    rounding(argument (float), levels (L,) float64, neuron i, column t) -> level (float).
This module imports nothing of the kernel or the alphabets, so the alphabets, the engine, the in-block step and
the layer rules all import it.
"""
import torch

THRESHOLDINGS = ("soft", "hard")


# ---------------------------------------------------------------- vectorized rounding rules
def round_to_alphabet(values: torch.Tensor, alphabet: torch.Tensor) -> torch.Tensor:
    """Nearest alphabet element of each entry (ties go to the smaller level).

    alphabet (L,): one alphabet for every entry of `values` (any shape).
    alphabet (..., L): one alphabet per leading index (e.g. per neuron, (G, N1, L)); values
    then have that leading shape, optionally with one trailing axis: (...) or (..., K).
    Levels must be sorted ascending along the last axis.
    """
    alphabet = alphabet.to(device=values.device, dtype=values.dtype)
    return round_with_midpoints(values, alphabet, alphabet_midpoints(alphabet))


def alphabet_midpoints(alphabet: torch.Tensor) -> torch.Tensor:
    """Midpoints between consecutive levels, (..., L−1): the rounding thresholds of `round_with_midpoints`."""
    return ((alphabet[..., 1:] + alphabet[..., :-1]) / 2).contiguous()


def round_with_midpoints(values, alphabet, midpoints):
    """`round_to_alphabet` with the midpoints computed beforehand (same dtype and device as values)."""
    if alphabet.dim() == 1:
        return alphabet[torch.bucketize(values, midpoints, right=False)]
    one_per_row = values.dim() == alphabet.dim() - 1
    columns = values.unsqueeze(-1) if one_per_row else values
    index = torch.searchsorted(midpoints, columns.contiguous(), right=False)
    rounded = alphabet.gather(-1, index)
    return rounded.squeeze(-1) if one_per_row else rounded


def nearest_rounding(argument, alphabet, t):
    """The plain GPFQ rule: nearest level."""
    return round_to_alphabet(argument, alphabet)


def stochastic_round(values: torch.Tensor, alphabet: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Unbiased stochastic rounding of `values` (...) to `alphabet` (L,) or (..., L), given uniforms like values.

    Rounds up to the next level when uniform < (z − lower)/(upper − lower), z clipped to the alphabet's range.
    """
    alphabet = alphabet.to(device=values.device, dtype=values.dtype)
    n_levels = alphabet.shape[-1]
    levels = alphabet if alphabet.dim() > 1 else alphabet.expand(*values.shape, n_levels)
    levels = levels.contiguous()
    if n_levels == 1:  # a layer of radius 0 has the alphabet {0}: nothing to choose
        return levels[..., 0].clone()
    clipped = torch.minimum(torch.maximum(values, levels[..., 0]), levels[..., -1])
    # index of the last level ≤ z, kept ≤ L−2 so that it has an upper neighbour
    lower_index = torch.searchsorted(levels, clipped.unsqueeze(-1).contiguous(), right=True) - 1
    lower_index = lower_index.clamp(0, n_levels - 2)
    lower = levels.gather(-1, lower_index).squeeze(-1)
    upper = levels.gather(-1, lower_index + 1).squeeze(-1)
    gap = upper - lower
    # a channel of radius 0 has equal levels (gap 0): no choice to make
    up_probability = torch.where(gap > 0, (clipped - lower) / torch.where(gap > 0, gap, torch.ones_like(gap)),
                                 torch.zeros_like(gap))
    return torch.where(uniforms.to(device=values.device, dtype=values.dtype) < up_probability, upper, lower)


class StochasticRounding:
    """SPFQ's rule: column t uses uniforms[..., t] (uniforms (G, N1, N0) drawn once, seeded)."""

    def __init__(self, uniforms: torch.Tensor):
        self.uniforms = uniforms

    def __call__(self, argument, alphabet, t):
        return stochastic_round(argument, alphabet, self.uniforms[..., t])


def threshold(values: torch.Tensor, lam, kind: str) -> torch.Tensor:
    """Soft (sign(z)·max(|z| − λ, 0)) or hard (z·1[|z| > λ]) thresholding; λ broadcasts against values."""
    if kind == "soft":
        return torch.sign(values) * torch.clamp(values.abs() - lam, min=0.0)
    if kind == "hard":
        return torch.where(values.abs() > lam, values, torch.zeros_like(values))
    raise ValueError(f"thresholding must be one of {THRESHOLDINGS}, got {kind!r}")


def largest_level(alphabet: torch.Tensor) -> torch.Tensor:
    """max |a| over the alphabet: a scalar for (L,), one per row for (..., L)."""
    return alphabet.abs().amax(dim=-1)


class ThresholdedRounding:
    """Sparse GPFQ's rule: threshold the argument by λ·max|A| (per row for per-row alphabets), then round."""

    def __init__(self, relative_threshold: float, kind: str):
        if kind not in THRESHOLDINGS:
            raise ValueError(f"thresholding must be one of {THRESHOLDINGS}, got {kind!r}")
        self.relative_threshold = relative_threshold
        self.kind = kind

    def __call__(self, argument, alphabet, t):
        alphabet = alphabet.to(device=argument.device, dtype=argument.dtype)
        lam = self.relative_threshold * largest_level(alphabet)
        return round_to_alphabet(threshold(argument, lam, self.kind), alphabet)


def seeded_uniforms(shape, seed: int, dtype=torch.float64) -> torch.Tensor:
    """Uniforms in [0, 1) from a generator seeded with `seed` (the same seed, the same draws)."""
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def spfq_rounding(weight_shape, seed: int, dtype=torch.float32) -> StochasticRounding:
    """SPFQ's rule for a layer of weight shape (G, N1, N0): its uniforms drawn from `seed`."""
    return StochasticRounding(seeded_uniforms(weight_shape, seed).to(dtype))



# ---------------------------------------------------------------- scalar rules (for the reference)
def nearest_scalar(argument, levels, i, t):
    """The nearest level; ties go to the smaller one."""
    return float(levels[torch.argmin((levels - argument).abs())])


class StochasticScalar:
    """Scalar SPFQ rule: uniforms (N1, N0) of one group."""

    def __init__(self, uniforms):
        self.uniforms = uniforms

    def __call__(self, argument, levels, i, t):
        values = sorted(float(v) for v in levels)
        z = min(max(argument, values[0]), values[-1])
        if z in values:
            return z
        lower = max(v for v in values if v < z)
        upper = min(v for v in values if v > z)
        return upper if float(self.uniforms[i, t]) < (z - lower) / (upper - lower) else lower


class ThresholdedScalar:
    """Scalar sparse-GPFQ rule: threshold by λ·max|levels|, then the nearest level."""

    def __init__(self, relative_threshold, kind):
        self.relative_threshold = relative_threshold
        self.kind = kind

    def __call__(self, argument, levels, i, t):
        lam = self.relative_threshold * max(abs(float(v)) for v in levels)
        if self.kind == "soft":
            z = (1.0 if argument > 0 else -1.0) * max(abs(argument) - lam, 0.0)
        else:
            z = argument if abs(argument) > lam else 0.0
        return nearest_scalar(z, levels, i, t)
