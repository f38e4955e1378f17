"""Qronos (Zhang, Zhang, Colbert & Saab, "Qronos: Correcting the Past by Shaping the Future in
Post-Training Quantization", 2025) for one layer, on the same alphabets and rows as GPFQ.

Per neuron w (a row of W), Qronos targets GPFQ's mismatched objective ||X w − X̃ q||², here with a
ridge term that keeps the least-squares steps well posed (damping λ ≥ 0):

    ||X w − X̃ q||² + λ ||w − q||²  =  ||X_λ w − X̃_λ q||²,   X_λ = [X; √λ I],  X̃_λ = [X̃; √λ I]

λ = damping · λ_max(X̃ᵀX̃) per group (the largest eigenvalue; default damping 1e-6, the value the
authors' implementation uses). With future weights v (v = w at the start), for t = 1 … N0:

    (correct the past)  q_t = Q_A( <X̃_λ,t , X_λ w − Σ_{j<t} q_j X̃_λ,j − Σ_{j>t} v_j X̃_λ,j> / ||X̃_λ,t||² )
    (shape the future)  v_{>t} = argmin_v || X_λ w − Σ_{j≤t} q_j X̃_λ,j − X̃_λ,>t v ||          (least squares)

(argument 0 when ||X̃_λ,t|| = 0, as GPFQ's). `qronos_reference` is that loop as written: the
executable specification.

`qronos_from_gram` is the fast form, from G = X̃ᵀX and H = X̃ᵀX̃ alone (streamed sums, memory flat
in m). With G_λ = G + λI and H_λ = H + λI (= X̃_λᵀX_λ and X̃_λᵀX̃_λ):
- step 1 reads   q_1 = Q_A( (Σ_j G_λ[1, j] w_j − Σ_{j>1} H_λ[1, j] w_j) / H_λ[1, 1] ),
                 v_{>1} = H_λ[>1, >1]⁻¹ (G_λ[>1, :] w − H_λ[>1, 1] q_1)      (one Cholesky solve);
- from t = 2 on, the residual left by the previous least-squares step is orthogonal to every
  X̃_λ,j with j ≥ t, so the correction's argument is v_t itself (q_t = Q_A(v_t)), and the update of the
  future weights is GPTQ's, with the inverse of H_λ restricted to the columns not yet quantized:
  run with the upper Cholesky factor of H_λ[>1, >1]⁻¹ and lazy blocks (`gptq.lazy_batch_rounding`).
Only the first step sees X (through G): it corrects the error the earlier quantized layers left in X̃.
With X̃ = X it is GPTQ's first step, and Qronos is GPTQ with this damping.

Shapes: weight (G, N1, N0), rows (G, m, N0), Grams (G, N0, N0), alphabet (L,) or (G, N1, L).
"""
import torch

from gpfq.methods.rounding import round_to_alphabet
from gpfq.methods.gpfq.column_order import gram_in_order, restore_columns, rows_in_order
from gpfq.methods.gptq import HessianNotPositiveDefinite, lazy_batch_rounding
from gpfq.methods.method import Method, order_option

DEFAULT_DAMPING = 1e-6
DEFAULT_BLOCK_SIZE = 128


def ridge(quantized_gram: torch.Tensor, damping: float) -> torch.Tensor:
    """λ = damping · λ_max(X̃ᵀX̃) of each group, float64 (G,). quantized_gram (G, N0, N0)."""
    if not damping >= 0:
        raise ValueError(f"Qronos damping must be ≥ 0, got {damping!r}")
    H = quantized_gram.detach().double()
    if damping == 0:
        return torch.zeros(H.shape[0], dtype=torch.float64, device=H.device)
    return damping * torch.linalg.eigvalsh(H)[:, -1].clamp_min(0)


def qronos_reference(weight, analog_input, quantized_input, alphabet, damping: float = DEFAULT_DAMPING):
    """One group, column by column, in float64: the definition above with explicit least squares.

    weight (N1, N0), analog_input / quantized_input (m, N0), alphabet (L,) or (N1, L) -> Q (N1, N0).
    All neurons are walked together (each column of the least-squares right-hand side is one neuron).
    """
    W = weight.detach().double()
    X = analog_input.detach().double()
    Xq = quantized_input.detach().double()
    levels = alphabet.double()
    n_neurons, n_inputs = W.shape
    lam = float(ridge((Xq.T @ Xq).unsqueeze(0), damping)[0])
    root = torch.eye(n_inputs, dtype=torch.float64) * lam ** 0.5
    X_ridge = torch.cat([X, root])  # X_λ (m + N0, N0)
    Xq_ridge = torch.cat([Xq, root])  # X̃_λ
    target = X_ridge @ W.T  # X_λ w for every neuron (m + N0, N1)
    Q = torch.zeros_like(W)
    future = W.clone()  # v: the weights not yet quantized, as updated so far
    for t in range(n_inputs):
        column = Xq_ridge[:, t]
        # correct the past: the best level for column t, the other columns held at q (before) and v (after)
        rest = target - Xq_ridge[:, :t] @ Q[:, :t].T - Xq_ridge[:, t + 1:] @ future[:, t + 1:].T
        norm2 = torch.dot(column, column)
        argument = (column @ rest) / norm2 if norm2 > 0 else torch.zeros(n_neurons, dtype=torch.float64)
        Q[:, t] = round_to_alphabet(argument, levels)
        # shape the future: the later weights that best fit what the quantized ones leave
        if t + 1 < n_inputs:
            remainder = target - Xq_ridge[:, :t + 1] @ Q[:, :t + 1].T
            future[:, t + 1:] = torch.linalg.lstsq(Xq_ridge[:, t + 1:], remainder).solution.T
    return Q


def qronos_from_gram(weight, cross, quantized_gram, alphabet, damping: float = DEFAULT_DAMPING,
                     block_size: int = DEFAULT_BLOCK_SIZE, dtype=torch.float32):
    """Blocked Qronos from cross = X̃ᵀX and quantized_gram = X̃ᵀX̃ (G, N0, N0). Returns Q (G, N1, N0) in
    weight's dtype. The first step and the Cholesky factors are computed in float64, the GPTQ-like
    column loop in `dtype`."""
    if block_size < 1:
        raise ValueError(f"block_size must be ≥ 1, got {block_size}")
    n_groups, n_neurons, n_inputs = weight.shape
    H = quantized_gram.detach().double()
    G = cross.detach().double().to(H.device)
    lam = ridge(H, damping).to(H.device)
    identity = torch.eye(n_inputs, dtype=torch.float64, device=H.device)
    H_ridge = H + lam[:, None, None] * identity
    G_ridge = G + lam[:, None, None] * identity
    # A group whose X̃ is all zero has no information: the definition gives argument 0 at every column
    # (the least-squares future is the minimum-norm 0). H_λ = I and G_λ = 0 give exactly that, and a
    # Cholesky factor.
    blank = H.flatten(1).abs().amax(dim=1) == 0
    H_ridge = torch.where(blank[:, None, None], identity, H_ridge)
    G_ridge = torch.where(blank[:, None, None], torch.zeros_like(G_ridge), G_ridge)
    Wt = weight.detach().double().transpose(1, 2)  # Wᵀ (G, N0, N1)
    levels = torch.as_tensor(alphabet).to(device=H.device)
    if levels.dim() == 2:  # one alphabet per output channel, as rows (G·N1, L)
        levels = levels.reshape(n_groups, n_neurons, -1)

    # step 1: correct the past with G, then the least-squares update of every later column
    norm2 = H_ridge[:, 0, 0]  # (G,)
    numerator = (G_ridge[:, 0:1, :] @ Wt - H_ridge[:, 0:1, 1:] @ Wt[:, 1:]).squeeze(1)  # (G, N1)
    safe = torch.where(norm2 > 0, norm2, torch.ones_like(norm2))
    argument = torch.where(norm2[:, None] > 0, numerator / safe[:, None], torch.zeros_like(numerator))
    first = round_to_alphabet(argument, levels.double())  # (G, N1)
    Q = torch.empty(n_groups, n_neurons, n_inputs, dtype=dtype, device=H.device)
    Q[:, :, 0] = first.to(dtype)
    if n_inputs == 1:
        return Q.to(weight.dtype)
    rest = H_ridge[:, 1:, 1:]
    try:
        factor = torch.linalg.cholesky(rest)
        right = G_ridge[:, 1:, :] @ Wt - H_ridge[:, 1:, 0:1] * first.unsqueeze(1)  # (G, N0−1, N1)
        future = torch.cholesky_solve(right, factor)  # v_{>1}
        inverse = torch.cholesky_solve(identity[1:, 1:].expand_as(rest).contiguous(), factor)
        upper = torch.linalg.cholesky(inverse, upper=True)  # row t: H_F⁻¹[t, t:] / sqrt(H_F⁻¹[t, t])
    except torch.linalg.LinAlgError as error:
        raise HessianNotPositiveDefinite(f"Qronos: X̃ᵀX̃ + λI is not positive definite (damping {damping}); use a "
                                         f"larger qronos_damping") from error
    # steps 2 … N0: round the current future weight, spread its error over the columns after it (GPTQ's update)
    Q[:, :, 1:] = lazy_batch_rounding(future.transpose(1, 2).to(dtype).contiguous(), upper.to(dtype),
                                      levels.to(dtype), block_size)
    return Q.to(weight.dtype)


def qronos(weight, analog_input, quantized_input, alphabet, damping: float = DEFAULT_DAMPING,
           block_size: int = DEFAULT_BLOCK_SIZE, dtype=torch.float32):
    """`qronos_from_gram` from rows (G, m, N0); the Grams are formed in float64 (with m < N0 the default ridge,
    1e-6 · λ_max, is below float32's resolution of X̃ᵀX̃; the network streams Qronos's sums in float64 too)."""
    X = analog_input.detach().double()
    Xq = quantized_input.detach().double()
    Xq_t = Xq.transpose(1, 2)
    return qronos_from_gram(weight, Xq_t @ X, Xq_t @ Xq, alphabet, damping, block_size, dtype)


def _qronos_from_rows(weight, analog, quantized, alphabet, config):
    order, weight, analog, quantized = rows_in_order(config.column_order, weight, analog, quantized)
    return restore_columns(qronos(weight, analog, quantized, alphabet, config.qronos_damping), order)


def _qronos_from_statistics(weight, statistics, alphabet, config):
    order, weight, cross, gram = gram_in_order(config.column_order, weight, statistics.cross,
                                               statistics.quantized_gram)
    return restore_columns(qronos_from_gram(weight, cross, gram, alphabet, config.qronos_damping), order)


# Its sums are float64: the ridge (1e-6 · λ_max by default) is below float32's resolution of X̃ᵀX̃.
QRONOS = Method("qronos", _qronos_from_rows, _qronos_from_statistics, statistics_dtype=torch.float64,
                describe=lambda config: f"damping {config.qronos_damping}{order_option(config)}")
