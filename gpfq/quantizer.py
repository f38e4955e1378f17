"""The GPFQ rule for one layer (notes §1), and round-to-nearest (MSQ) beside it.

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
once. The 2022 code's shortcut (return Q_A(w_t) when |<X̃_t, u_{t-1}>| < 1e-10) is
not kept: it only matters when the residual is exactly orthogonal to X̃_t.
"""
import torch

from .alphabet import round_to_alphabet


def gpfq_reference(weight, analog_input, quantized_input, alphabet):
    """Neuron-by-neuron, column-by-column GPFQ in float64 (the specification).

    weight (N1, N0), analog_input (m, N0), quantized_input (m, N0) -> Q (N1, N0).
    """
    W = weight.detach().double()
    X = analog_input.detach().double()
    Xq = quantized_input.detach().double()
    levels = alphabet.double()
    n_neurons, n_inputs = W.shape
    Q = torch.zeros_like(W)
    for i in range(n_neurons):
        u = torch.zeros(X.shape[0], dtype=torch.float64)
        for t in range(n_inputs):
            norm2 = torch.dot(Xq[:, t], Xq[:, t])
            target = u + W[i, t] * X[:, t]
            argument = torch.dot(Xq[:, t], target) / norm2 if norm2 > 0 else torch.tensor(0.0, dtype=torch.float64)
            q = levels[torch.argmin((levels - argument).abs())]  # first minimum: ties go to the smaller level
            Q[i, t] = q
            u = target - q * Xq[:, t]
    return Q


def gpfq_columns(weight, analog_input, quantized_input, alphabet, dtype=torch.float32):
    """GPFQ over all neurons and groups at once, one input column per step.

    weight (G, N1, N0), analog_input (G, m, N0), quantized_input (G, m, N0) -> Q (G, N1, N0),
    in weight's dtype. Keeps the residual U = (X Wᵀ − X̃ Qᵀ)ᵀ of the columns done so far,
    shape (G, N1, m).
    """
    W = weight.detach().to(dtype)
    X = analog_input.detach().to(dtype)
    Xq = quantized_input.detach().to(dtype)
    levels = alphabet.to(device=W.device, dtype=dtype)
    n_groups, n_neurons, n_inputs = W.shape
    norms2 = (Xq * Xq).sum(dim=1)  # (G, N0)
    # Columns with ||X̃_t|| = 0 get argument 0: divide by 1 there, the numerator is 0 anyway.
    safe_norms2 = torch.where(norms2 > 0, norms2, torch.ones_like(norms2))
    zero_column = norms2 <= 0
    residual = torch.zeros(n_groups, n_neurons, X.shape[1], dtype=dtype, device=W.device)
    Q = torch.empty_like(W)
    for t in range(n_inputs):
        x_t = X[:, :, t].unsqueeze(1)  # (G, 1, m)
        xq_t = Xq[:, :, t].unsqueeze(2)  # (G, m, 1)
        residual.addcmul_(W[:, :, t].unsqueeze(2), x_t)  # u + w_t X_t
        argument = torch.bmm(residual, xq_t).squeeze(2) / safe_norms2[:, t].unsqueeze(1)  # (G, N1)
        argument = torch.where(zero_column[:, t].unsqueeze(1), torch.zeros_like(argument), argument)
        q = round_to_alphabet(argument, levels)
        Q[:, :, t] = q
        residual.sub_(q.unsqueeze(2) * xq_t.transpose(1, 2))
    return Q.to(weight.dtype)


def msq(weight, alphabet):
    """Round every weight to its nearest alphabet element (no data). Any shape."""
    return round_to_alphabet(weight.detach().double(), alphabet.double()).to(weight.dtype)


def relative_error(weight, quantized_weight, analog_input, quantized_input, chunk_rows=65536):
    """||X Wᵀ − X̃ Qᵀ||_F / ||X Wᵀ||_F summed over groups; shapes as `gpfq_columns`."""
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
    return float(gap2.sqrt() / ref2.sqrt()) if ref2 > 0 else float(gap2.sqrt())
