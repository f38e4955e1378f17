"""The GPFQ rule for one layer (docs/theory.md), and round-to-nearest (MSQ) beside it.

Shapes: a layer is given as ``groups`` independent problems (1 for Linear and
ordinary convolutions, C_in/… for grouped and depthwise ones):

    weight          (G, N1, N0)   rows are neurons, columns are inputs
    analog_input    (G, m, N0)    X: the float network's layer input
    quantized_input (G, m, N0)    X̃: the partially quantized network's layer input

For each neuron w, with u_0 = 0 and t = 1 … N0:

    q_t = Q_A(<X̃_t, u_{t-1} + w_t X_t> / ||X̃_t||²)       (argument 0 if ||X̃_t|| = 0)
    u_t = u_{t-1} + w_t X_t − q_t X̃_t

`gpfq_reference` is that loop written out neuron by neuron: the executable
specification. `gpfq_columns` runs the same loop over all neurons (and groups) at
once. Both take the rounding rule Q_A as `rounding=` (`gpfq.methods.rounding`: nearest for GPFQ,
stochastic for SPFQ, thresholded for sparse GPFQ), so every method of the family has one
reference and one per-column loop.

First column (`first_column`): "paper" (default) is the rule above at every column.
"code2022" adds the shortcut of the code that made the paper's tables:

    if |<X̃_t, u_{t-1}>| < 1e-10:  q_t = Q_A(w_t)

Since u_0 = 0, it fires at every neuron's first column (t = 1), where it rounds w_1
itself instead of <X̃_1, w_1 X_1>/||X̃_1||²; the two differ whenever X̃_1 ≠ X_1 (e.g.
X = [[1], [1]], X̃ = 2X, w = 0.4, levels {−1, −0.5, 0, 0.5, 1}: "code2022" gives 0.5,
"paper" 0). At later columns it fires only when the residual is orthogonal to X̃_t.
"""
import math

import torch

from gpfq.methods.rounding import nearest_rounding, nearest_scalar, round_to_alphabet

FIRST_COLUMN_RULES = ("paper", "code2022")
SHORTCUT_TOLERANCE = 1e-10  # the 2022 code's |<X̃_t, u_{t-1}>| < 1e-10



def check_first_column(first_column: str) -> None:
    if first_column not in FIRST_COLUMN_RULES:
        raise ValueError(f"first_column must be one of {FIRST_COLUMN_RULES}, got {first_column!r}")


def gpfq_reference(weight, analog_input, quantized_input, alphabet, rounding=nearest_scalar, first_column="paper"):
    """Neuron-by-neuron, column-by-column GPFQ in float64 (the specification).

    weight (N1, N0), analog_input (m, N0), quantized_input (m, N0), alphabet (L,) or one per neuron (N1, L)
    -> Q (N1, N0). rounding(argument, levels (L,) float64, neuron i, column t) -> level: a scalar rule of
    `gpfq.methods.rounding` (default: the nearest level, ties to the smaller one). first_column: "paper" or
    "code2022" (the 2022 code's shortcut, see the module docstring).
    """
    check_first_column(first_column)
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
            if first_column == "code2022" and abs(float(torch.dot(Xq[:, t], u))) < SHORTCUT_TOLERANCE:
                argument = float(W[i, t])
            q = rounding(argument, levels, i, t)
            Q[i, t] = q
            u = target - q * Xq[:, t]
    return Q


def gpfq_columns(weight, analog_input, quantized_input, alphabet, dtype=torch.float32, rounding=nearest_rounding,
                 first_column="paper"):
    """GPFQ over all neurons and groups at once, one input column per step.

    weight (G, N1, N0), analog_input (G, m, N0), quantized_input (G, m, N0), alphabet (L,) or (G, N1, L)
    -> Q (G, N1, N0), in weight's dtype. Keeps the residual U = (X Wᵀ − X̃ Qᵀ)ᵀ of the columns done so
    far, shape (G, N1, m). rounding(argument (G, N1), alphabet, t) -> q: a vectorized rule of
    `gpfq.methods.rounding` (default: nearest). first_column: as `gpfq_reference`.
    """
    check_first_column(first_column)
    # Column-major copies, so that column t of W, X and X̃ is one contiguous read.
    weight_t = weight.detach().to(dtype).transpose(1, 2).contiguous()  # (G, N0, N1)
    analog_t = analog_input.detach().to(dtype).transpose(1, 2).contiguous()  # (G, N0, m)
    quantized_t = quantized_input.detach().to(dtype).transpose(1, 2).contiguous()  # (G, N0, m)
    levels = alphabet.to(device=weight_t.device, dtype=dtype)
    n_groups, n_inputs, n_neurons = weight_t.shape
    norms2 = (quantized_t * quantized_t).sum(dim=2)  # (G, N0)
    # Columns with ||X̃_t|| = 0 get argument 0: divide by 1 there, the numerator is 0 anyway.
    zero_column = norms2 <= 0
    safe_norms2 = torch.where(zero_column, torch.ones_like(norms2), norms2)
    residual = torch.zeros(n_groups, n_neurons, analog_t.shape[2], dtype=dtype, device=weight_t.device)
    quantized_weight_t = torch.empty_like(weight_t)
    for t in range(n_inputs):
        xq_t = quantized_t[:, t].unsqueeze(2)  # (G, m, 1)
        if first_column == "code2022":
            shortcut = torch.bmm(residual, xq_t).squeeze(2).abs() < SHORTCUT_TOLERANCE  # |<X̃_t, u_{t-1}>| (G, N1)
        residual.addcmul_(weight_t[:, t].unsqueeze(2), analog_t[:, t].unsqueeze(1))  # u + w_t X_t
        argument = torch.bmm(residual, xq_t).squeeze(2) / safe_norms2[:, t].unsqueeze(1)  # (G, N1)
        argument.masked_fill_(zero_column[:, t].unsqueeze(1), 0.0)
        if first_column == "code2022":
            argument = torch.where(shortcut, weight_t[:, t], argument)
        q = rounding(argument, levels, t)
        quantized_weight_t[:, t] = q
        residual.sub_(q.unsqueeze(2) * xq_t.transpose(1, 2))
    Q = quantized_weight_t.transpose(1, 2)
    return Q.to(weight.dtype)


def msq(weight, alphabet):
    """Round every weight to its nearest alphabet element (no data). Any shape."""
    return round_to_alphabet(weight.detach().double(), alphabet.double()).to(weight.dtype)


def relative_error(weight, quantized_weight, analog_input, quantized_input, chunk_rows=65536):
    """||X Wᵀ − X̃ Qᵀ||_F / ||X Wᵀ||_F summed over groups; shapes as `gpfq_columns`. NaN when ||X Wᵀ|| = 0."""
    W = weight.double()
    Q = quantized_weight.double()
    gap2 = torch.zeros((), dtype=torch.float64)
    ref2 = torch.zeros((), dtype=torch.float64)
    for start in range(0, analog_input.shape[1], chunk_rows):
        X = analog_input[:, start:start + chunk_rows].double()
        Xq = quantized_input[:, start:start + chunk_rows].double()
        analog_output = torch.bmm(X, W.transpose(1, 2))
        gap2 += (analog_output - torch.bmm(Xq, Q.transpose(1, 2))).pow(2).sum()
        ref2 += analog_output.pow(2).sum()
    return float(gap2.sqrt() / ref2.sqrt()) if ref2 > 0 else math.nan  # ‖XWᵀ‖ = 0: a ratio to 0 is undefined
