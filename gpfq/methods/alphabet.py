"""Quantization alphabets (docs/theory.md). Rounding to them is `gpfq.methods.rounding` (`round_to_alphabet`,
re-exported here).

Every alphabet is a sorted 1-D float tensor of levels. The radius ``rad`` of a
layer is the mean, over neurons (rows of the reshaped weight), of the
``percentile``-quantile of the absolute weights; percentile 1.0 is the max.
"""
import torch

from gpfq.methods.rounding import round_to_alphabet  # noqa: F401  (re-exported: rounding to an alphabet)

ALPHABET_KINDS = ("gpfq2022", "midtread", "strict")
# Alphabets are tables of up to 2^b + 1 levels (one table per output channel with per-channel alphabets),
# rounded to in float32. Past 16 bits (65,537 levels) the tables outgrow memory on wide layers and
# neighbouring levels come within float32's resolution of each other (2^-23 of the radius at 24 bits).
MAX_BITS = 16
# One radius for the whole layer (the paper), or one per output channel (row of the weight).
GRANULARITIES = ("layer", "channel")


def row_radii(weight: torch.Tensor, percentile: float) -> torch.Tensor:
    """quantile(|W_i|, percentile) of every row i, float64 (N1,). weight: (N1, N0)."""
    if not 0.0 < percentile <= 1.0:
        raise ValueError(f"percentile must be in (0, 1], got {percentile}")
    absw = weight.detach().abs().reshape(weight.shape[0], -1).double()
    if percentile == 1.0:
        return absw.max(dim=1).values
    return torch.quantile(absw, percentile, dim=1)


def layer_radius(weight: torch.Tensor, percentile: float) -> float:
    """Mean over rows of quantile(|W_i|, percentile). weight: (N1, N0)."""
    return float(row_radii(weight, percentile).mean())


def make_alphabet(kind: str, bits: int, scalar: float, radius: float, include_zero: bool = True) -> torch.Tensor:
    """Levels of a `bits`-bit alphabet of radius `scalar * radius`, sorted ascending (float64).

    - ``gpfq2022``: C·rad·linspace(-1, 1, 2^b), with 0 appended when `include_zero`
      (2^b + 1 levels; the paper's tables).
    - ``midtread``: {k·δ : |k| ≤ 2^(b-1)}, δ = C·rad / 2^(b-1) (2^b + 1 levels; 2023 code).
    - ``strict``: {k·δ : -2^(b-1) ≤ k ≤ 2^(b-1) - 1}, same δ: exactly 2^b levels, a
      signed b-bit integer grid, for honest comparison with other methods.
    """
    if kind not in ALPHABET_KINDS:
        raise ValueError(f"unknown alphabet kind {kind!r}; choose one of {ALPHABET_KINDS}")
    if not (isinstance(bits, int) and 1 <= bits <= MAX_BITS):
        raise ValueError(f"bits must be an integer from 1 to {MAX_BITS}, got {bits!r}")
    top = scalar * radius
    if kind == "gpfq2022":
        levels = torch.linspace(-1.0, 1.0, 2 ** bits, dtype=torch.float64) * top
        if include_zero:
            levels = torch.cat([levels, torch.zeros(1, dtype=torch.float64)])
    else:
        half = 2 ** (bits - 1)
        delta = top / half
        upper = half if kind == "midtread" else half - 1
        levels = torch.arange(-half, upper + 1, dtype=torch.float64) * delta
    return torch.unique(levels)  # sorted; drops a duplicate 0 if linspace already held it


def channel_alphabets(kind: str, bits: int, scalar: float, radii: torch.Tensor,
                      include_zero: bool = True) -> torch.Tensor:
    """One alphabet per output channel: (N1, L), row i = make_alphabet(kind, bits, scalar, radii[i]).

    Every kind is linear in its radius, so the rows are the unit alphabet scaled by each radius.
    A channel of radius 0 (all-zero weights) gets L copies of 0.
    """
    unit = make_alphabet(kind, bits, scalar, 1.0, include_zero)
    return radii.double().unsqueeze(1) * unit.unsqueeze(0)
