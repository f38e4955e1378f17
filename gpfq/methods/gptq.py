"""GPTQ / OPTQ (Frantar et al. 2023) for one layer, on the same alphabets and rows as GPFQ.

GPTQ minimizes ||X̃ Wᵀ − X̃ Qᵀ||_F column by column: with H = X̃ᵀX̃ (its input is the
partially quantized network's X̃, like GPFQ's), quantize column t to the nearest level and
spread its error over the columns not yet quantized through the inverse Hessian of those
columns (the optimal-brain-surgeon update):

    e = (w_t − q_t) / [H_F⁻¹]_tt,   w_F ← w_F − e · [H_F⁻¹]_{t,F},   H_F⁻¹ ← H_F⁻¹ − H_F⁻¹_{:,t} H_F⁻¹_{t,:} / [H_F⁻¹]_tt

`gptq_reference` is that definition, one column at a time with the explicit inverse.
`gptq` is the fast form: the rows of the upper Cholesky factor of H⁻¹ hold every H_F⁻¹ row the
loop needs (scaled), and "lazy batch" blocking applies the updates from a block of B columns to
the later columns with one matrix product. Both share:
- dead inputs (H_tt = 0, the column of X̃ is always 0): H_tt := 1 and w_t := 0 (no information);
- damping: H += damping · mean(diag H) · I (keeps H invertible when m < N0);
- act-order (optional): columns are processed in order of decreasing H_tt.
"""
import torch

from gpfq.methods.rounding import round_to_alphabet
from gpfq.methods.method import Method


class HessianNotPositiveDefinite(RuntimeError):
    """H + damping·I could not be factored: raise the damping."""


def _hessian(quantized_input, damping):
    """Damped H = X̃ᵀX̃ (G, N0, N0) in float64 and the dead-input mask (G, N0)."""
    Xq = quantized_input.detach().double()
    return _damped(torch.bmm(Xq.transpose(1, 2), Xq), damping)


def _damped(quantized_gram, damping):
    """H = X̃ᵀX̃ (G, N0, N0), damped, in float64, and the dead-input mask (G, N0)."""
    H = quantized_gram.detach().double()
    diagonal = H.diagonal(dim1=1, dim2=2)
    dead = diagonal == 0
    H = H + torch.diag_embed(dead.double())
    H = H + torch.diag_embed(damping * H.diagonal(dim1=1, dim2=2).mean(dim=1, keepdim=True).expand_as(diagonal))
    return H, dead


def _column_order(H, act_order):
    """(G, N0) processing order: decreasing H_tt (stable) with act-order, else the natural order."""
    n_groups, n_inputs = H.shape[0], H.shape[1]
    if act_order:
        return torch.argsort(H.diagonal(dim1=1, dim2=2), dim=1, descending=True, stable=True)
    return torch.arange(n_inputs).expand(n_groups, n_inputs)


def gptq(weight, quantized_input, alphabet, block_size: int = 128, damping: float = 0.01, act_order: bool = False,
         dtype=torch.float32):
    """Blocked GPTQ of all neurons and groups. weight (G, N1, N0), quantized_input (G, m, N0),
    alphabet (L,) or (G, N1, L) -> Q (G, N1, N0) in weight's dtype.
    """
    Xq = quantized_input.detach().double()
    return gptq_from_gram(weight, torch.bmm(Xq.transpose(1, 2), Xq), alphabet, block_size, damping, act_order,
                          dtype)


def gptq_from_gram(weight, quantized_gram, alphabet, block_size: int = 128, damping: float = 0.01,
                   act_order: bool = False, dtype=torch.float32):
    """`gptq` from H = X̃ᵀX̃ (G, N0, N0) alone (streamed sums, `gpfq.methods.gpfq.engine.GramStatistics`): GPTQ needs no rows."""
    if block_size < 1:
        raise ValueError(f"block_size must be ≥ 1, got {block_size}")
    n_groups, n_neurons, n_inputs = weight.shape
    H, dead = _damped(quantized_gram, damping)
    W = weight.detach().to(dtype).clone()
    W.masked_fill_(dead.unsqueeze(1), 0.0)
    order = _column_order(H, act_order)
    batch = torch.arange(n_groups).unsqueeze(1)
    W = W.gather(2, order.unsqueeze(1).expand(n_groups, n_neurons, n_inputs))
    H = H[batch.unsqueeze(2), order.unsqueeze(2), order.unsqueeze(1)]
    try:
        # H⁻¹ from H's Cholesky factor (torch.cholesky_inverse is far slower on CPU than this solve)
        factor = torch.linalg.cholesky(H)
        inverse = torch.cholesky_solve(torch.eye(n_inputs, dtype=H.dtype).expand_as(H).contiguous(), factor)
        U = torch.linalg.cholesky(inverse, upper=True).to(dtype)  # row t: H_F⁻¹[t, t:] / sqrt(H_F⁻¹[t, t])
    except torch.linalg.LinAlgError as error:
        raise HessianNotPositiveDefinite(f"GPTQ: X̃ᵀX̃ + damping is not positive definite (damping {damping}); "
                                         f"use a larger gptq_damping") from error
    Q = lazy_batch_rounding(W, U, alphabet.to(device=W.device, dtype=dtype), block_size)
    restored = torch.empty_like(Q)
    restored.scatter_(2, order.unsqueeze(1).expand(n_groups, n_neurons, n_inputs), Q)
    return restored.to(weight.dtype)


def lazy_batch_rounding(W, U, levels, block_size: int):
    """GPTQ's column loop: W (G, N1, N0), modified in place, U (G, N0, N0) the upper Cholesky factor of H⁻¹,
    levels (L,) or (G, N1, L), all in one dtype. Round column t to nearest, spread its error over the later
    columns (within the block at once, beyond it one product per block). Returns Q (G, N1, N0)."""
    n_inputs = W.shape[2]
    Q = torch.empty_like(W)
    for start in range(0, n_inputs, block_size):
        end = min(start + block_size, n_inputs)
        block = W[:, :, start:end].clone()
        errors = torch.empty_like(block)
        U_block = U[:, start:end, start:end]
        for j in range(end - start):
            column = block[:, :, j]
            q = round_to_alphabet(column.contiguous(), levels)
            Q[:, :, start + j] = q
            error = (column - q) / U_block[:, j, j].unsqueeze(1)  # (G, N1)
            block[:, :, j:] -= error.unsqueeze(2) * U_block[:, j, j:].unsqueeze(1)
            errors[:, :, j] = error
        # lazy batch: the block's errors reach every later column in one product
        W[:, :, end:] -= torch.bmm(errors, U[:, start:end, end:])
    return Q


def gptq_reference(weight, quantized_input, alphabet, damping: float = 0.01, act_order: bool = False):
    """One group, unblocked, in float64: the per-column definition (explicit inverse, OBS updates).

    weight (N1, N0), quantized_input (m, N0), alphabet (L,) or (N1, L) -> Q (N1, N0).
    """
    H, dead = _hessian(quantized_input.unsqueeze(0), damping)
    H, dead = H[0], dead[0]
    order = _column_order(H.unsqueeze(0), act_order)[0]
    W = weight.detach().double().clone()
    W[:, dead] = 0.0
    inverse = torch.linalg.inv(H)  # inverse Hessian of the columns not yet quantized
    Q = torch.zeros_like(W)
    levels = alphabet.double()
    for t in order.tolist():
        q = round_to_alphabet(W[:, t].contiguous(), levels)
        Q[:, t] = q
        pivot = inverse[t, t]
        error = (W[:, t] - q) / pivot
        W -= error.unsqueeze(1) * inverse[t].unsqueeze(0)
        inverse = inverse - torch.outer(inverse[:, t], inverse[t]) / pivot  # remove column t
    return Q


def _gptq_from_rows(weight, analog, quantized, alphabet, config):
    return gptq(weight, quantized, alphabet, config.gptq_block_size, config.gptq_damping, config.gptq_act_order)


def _gptq_from_statistics(weight, statistics, alphabet, config):
    return gptq_from_gram(weight, statistics.quantized_gram, alphabet, config.gptq_block_size, config.gptq_damping,
                          config.gptq_act_order)


def _gptq_options(config) -> str:
    order = ", act-order" if config.gptq_act_order else ""
    return f"block {config.gptq_block_size}, damping {config.gptq_damping}{order}"


# GPTQ sees only X̃ (through X̃ᵀX̃): from rows, or from streamed sums when they are cheaper to hold
GPTQ = Method("gptq", _gptq_from_rows, _gptq_from_statistics, describe=_gptq_options)
