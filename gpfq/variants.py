"""GPFQ with other rounding rules (docs/methods.md): stochastic GPFQ (SPFQ, order 1) and sparse GPFQ.

The GPFQ walk is unchanged; only the map from a column's argument
z = <X̃_t, u_{t-1} + w_t X_t> / ||X̃_t||² to an alphabet level differs:

- stochastic: z is clipped to [min A, max A]; with a ≤ z ≤ a' the neighbouring levels,
  q = a' with probability (z − a)/(a' − a), else a (unbiased: E q = z). On the uniform grid
  this is "round down with probability 1 − frac(z/δ)". Seeded: the uniforms of all
  (neuron, column) pairs are drawn up front from one generator.
- sparse: z is thresholded before nearest rounding, soft (L1): sign(z)·max(|z| − λ, 0), or
  hard (L0): z·1[|z| > λ]. λ is given relative to the alphabet's largest level (C·rad of the
  layer, or of the channel with per-channel alphabets), so one value means the same on every
  layer; arguments the threshold sends to 0 round to the level 0, hence sparsity.

A vectorized rounding rule has the signature
    rounding(argument (G, N1), alphabet (L,) or (G, N1, L), column t) -> q (G, N1)
and `gpfq_rounded` is the GPFQ column loop with it; the blocked engine (`gpfq.engine`, `rounding=`)
takes the same rules, and its compiled in-block kernel knows these two.
`gpfq_rounded_reference` is `quantizer.gpfq_reference` with a scalar rule
    rounding(argument (float), levels (L,) float64, neuron i, column t) -> level (float)
in place of nearest rounding: the executable specification the tests hold the fast path to.
"""
import torch

from .alphabet import round_to_alphabet

THRESHOLDINGS = ("soft", "hard")


# ---------------------------------------------------------------- vectorized rounding rules
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


# ---------------------------------------------------------------- the column loop
def gpfq_rounded(weight, analog_input, quantized_input, alphabet, rounding=nearest_rounding, dtype=torch.float32):
    """GPFQ over all neurons and groups, column by column, with `rounding` in place of nearest.

    weight (G, N1, N0), analog_input / quantized_input (G, m, N0), alphabet (L,) or (G, N1, L)
    -> Q (G, N1, N0) in weight's dtype. Residual form: U = (X Wᵀ − X̃ Qᵀ)ᵀ, (G, N1, m).
    """
    W = weight.detach().to(dtype)
    X = analog_input.detach().to(dtype)
    Xq = quantized_input.detach().to(dtype)
    levels = alphabet.to(device=W.device, dtype=dtype)
    n_groups, n_neurons, n_inputs = W.shape
    norms2 = (Xq * Xq).sum(dim=1)  # (G, N0)
    zero_column = norms2 <= 0  # argument 0 by definition
    safe_norms2 = torch.where(zero_column, torch.ones_like(norms2), norms2)
    residual = torch.zeros(n_groups, n_neurons, X.shape[1], dtype=dtype, device=W.device)
    Q = torch.empty_like(W)
    for t in range(n_inputs):
        xq_t = Xq[:, :, t].unsqueeze(2)  # (G, m, 1)
        residual.addcmul_(W[:, :, t].unsqueeze(2), X[:, :, t].unsqueeze(1))  # u + w_t X_t
        argument = torch.bmm(residual, xq_t).squeeze(2) / safe_norms2[:, t].unsqueeze(1)  # (G, N1)
        argument = torch.where(zero_column[:, t].unsqueeze(1), torch.zeros_like(argument), argument)
        q = rounding(argument, levels, t)
        Q[:, :, t] = q
        residual.sub_(q.unsqueeze(2) * xq_t.transpose(1, 2))
    return Q.to(weight.dtype)


def gpfq_rounded_reference(weight, analog_input, quantized_input, alphabet, rounding):
    """Neuron-by-neuron GPFQ in float64 with a scalar rule (the specification of `gpfq_rounded`).

    weight (N1, N0), analog_input / quantized_input (m, N0), alphabet (L,) or (N1, L) -> Q (N1, N0).
    rounding(argument, levels (L,), i, t) -> level.
    """
    W = weight.detach().double()
    X = analog_input.detach().double()
    Xq = quantized_input.detach().double()
    n_neurons, n_inputs = W.shape
    Q = torch.zeros_like(W)
    for i in range(n_neurons):
        levels = (alphabet if alphabet.dim() == 1 else alphabet[i]).double()
        u = torch.zeros(X.shape[0], dtype=torch.float64)
        for t in range(n_inputs):
            norm2 = float(torch.dot(Xq[:, t], Xq[:, t]))
            target = u + W[i, t] * X[:, t]
            argument = float(torch.dot(Xq[:, t], target)) / norm2 if norm2 > 0 else 0.0
            q = rounding(argument, levels, i, t)
            Q[i, t] = q
            u = target - q * Xq[:, t]
    return Q


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


# ---------------------------------------------------------------- layer rules
def _walk(weight, analog_input, quantized_input, alphabet, rounding, engine, dtype):
    """The GPFQ walk with `rounding`: the per-column loop for engine 'columns', else the blocked engine."""
    if engine == "columns":
        return gpfq_rounded(weight, analog_input, quantized_input, alphabet, rounding, dtype)
    from .engine import gpfq_blocked  # here, not at the top: the engine imports this module's rules
    return gpfq_blocked(weight, analog_input, quantized_input, alphabet, form=engine, dtype=dtype, rounding=rounding)


def spfq_rounding(weight_shape, seed: int, dtype=torch.float32) -> StochasticRounding:
    """SPFQ's rule for a layer of weight shape (G, N1, N0): its uniforms drawn from `seed`."""
    return StochasticRounding(seeded_uniforms(weight_shape, seed).to(dtype))


def spfq(weight, analog_input, quantized_input, alphabet, seed: int, dtype=torch.float32, engine="auto"):
    """Stochastic GPFQ of one layer; shapes as `gpfq_rounded`. Same seed, same Q.

    engine: 'columns' (`gpfq_rounded`) or a form of the blocked engine ('auto', 'residual', 'gram').
    """
    return _walk(weight, analog_input, quantized_input, alphabet, spfq_rounding(weight.shape, seed, dtype), engine,
                 dtype)


def sparse_gpfq(weight, analog_input, quantized_input, alphabet, relative_threshold: float, kind: str,
                dtype=torch.float32, engine="auto"):
    """Sparse GPFQ of one layer; shapes as `gpfq_rounded`; engine as `spfq`."""
    return _walk(weight, analog_input, quantized_input, alphabet, ThresholdedRounding(relative_threshold, kind),
                 engine, dtype)
