"""Integer codes of quantized weights: codebooks, bit packing and the honest count of bits.

A quantized layer's weights lie on its alphabet: L levels for the whole layer, or L levels per
output channel. Its codebook is that alphabet in the weight's dtype, shape (L,) or (C_out, L), and
each weight is stored as the index (code) of its level, packed at ⌈log2 L⌉ bits (`stored_bits`).
The empirical entropy of the codes says how many bits an entropy coder would need on average.
"""
import math

import numpy as np
import torch


class NotOnAlphabetError(ValueError):
    """A weight that should be quantized does not equal any level of its alphabet."""


def stored_bits(levels: int) -> int:
    """⌈log2 L⌉: the bits that index L levels (0 for a single level)."""
    if levels < 1:
        raise ValueError(f"an alphabet needs at least one level, got {levels}")
    return (levels - 1).bit_length()


def layer_codebook(alphabet: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The codebook of a layer in the weight's dtype: (L,) for one alphabet, (C_out, L) per channel.

    alphabet: (L,), or one alphabet per output channel in any leading shape (…, L) whose leading
    sizes multiply to C_out = weight.shape[0] (e.g. the grouped (G, N1, L)).
    """
    codebook = alphabet.detach().to(device="cpu", dtype=weight.dtype)
    if codebook.dim() == 1:
        return codebook.contiguous()
    codebook = codebook.reshape(-1, codebook.shape[-1])
    if codebook.shape[0] != weight.shape[0]:
        raise ValueError(f"a per-channel alphabet has {codebook.shape[0]} rows for a weight with "
                         f"{weight.shape[0]} output channels")
    return codebook.contiguous()


def encode(weight: torch.Tensor, codebook: torch.Tensor, name: str = "weight") -> torch.Tensor:
    """Codes (int64, weight's shape) with codebook[code] == weight exactly (per channel: codebook[c, code]).

    NotOnAlphabetError if any weight is not one of its levels.
    """
    weight = weight.detach().cpu()
    rows = weight.reshape(weight.shape[0], -1)
    if codebook.dim() == 1:
        index = torch.bucketize(rows, codebook).clamp_(max=codebook.numel() - 1)
        found = codebook[index]
    else:
        index = torch.searchsorted(codebook, rows.contiguous()).clamp_(max=codebook.shape[1] - 1)
        found = codebook.gather(1, index)
    off = found != rows
    if bool(off.any()):
        first = tuple(int(i) for i in off.nonzero()[0])
        raise NotOnAlphabetError(
            f"{name}: {int(off.sum())} of {rows.numel()} weights are not on the layer's alphabet (first at row, "
            f"column {first}: {float(rows[first]):.9g}); was the weight changed after quantization?")
    return index.reshape(weight.shape)


def decode(codes: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """The weights of `codes` (shape (C_out, …)): codebook[codes], or codebook[c, codes[c]] per channel."""
    codes = codes.long()
    if codebook.dim() == 1:
        return codebook[codes]
    rows = codes.reshape(codes.shape[0], -1)
    return codebook.gather(1, rows).reshape(codes.shape)


def code_entropy(codes: torch.Tensor, levels: int) -> float:
    """Empirical entropy of the codes' histogram, in bits per weight (one table for the whole layer)."""
    counts = torch.bincount(codes.reshape(-1).long(), minlength=levels).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log2()).sum()) if p.numel() > 1 else 0.0


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes (any shape, each < 2^bits) as a flat uint8 tensor of ⌈n·bits/8⌉ bytes, little-endian bit order:
    bit j of code i is bit (i·bits + j) of the stream."""
    flat = codes.reshape(-1).to(torch.int64).numpy()
    if bits == 0:
        return torch.zeros(0, dtype=torch.uint8)
    if flat.size and (flat.min() < 0 or flat.max() >= 2 ** bits):
        raise ValueError(f"codes must lie in [0, {2 ** bits}) to be packed at {bits} bits")
    shifts = np.arange(bits, dtype=np.int64)
    stream = ((flat[:, None] >> shifts) & 1).astype(np.uint8)
    return torch.from_numpy(np.packbits(stream.reshape(-1), bitorder="little"))


def unpack_codes(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The `count` codes (int64, flat) that `pack_codes` packed at `bits` bits."""
    if bits == 0:
        return torch.zeros(count, dtype=torch.int64)
    if packed.numel() != packed_bytes(count, bits):
        raise ValueError(f"{packed.numel()} bytes cannot hold {count} codes of {bits} bits "
                         f"({packed_bytes(count, bits)} expected)")
    stream = np.unpackbits(packed.numpy(), count=count * bits, bitorder="little").reshape(count, bits)
    weights = (1 << np.arange(bits, dtype=np.int64))
    return torch.from_numpy(stream.astype(np.int64) @ weights)


def packed_bytes(count: int, bits: int) -> int:
    return math.ceil(count * bits / 8)
