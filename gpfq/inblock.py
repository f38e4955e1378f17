"""GPFQ's in-block sequential step: round a block's columns in order, each correcting the later ones.

For a block of B columns (notes §1, `gpfq.engine`), given per group the arguments' numerators
a (B, N1), which already hold everything from the columns before the block, and the block's Gram
H = X̃_bᵀX̃_b (B, B), with d_t = H[t, t]:

    q_t = Q_A(a_t / d_t − Σ_{j<t} (H[j, t] / d_t) q_j),   t = 0 … B−1   (argument 0 if d_t = 0)

for every neuron. Two implementations of the same arithmetic (corrections subtracted in the order
j = 0, 1, …):
- `round_block_torch`: a few tensor operations per column; any device.
- the compiled kernel (numba): one call per block; CPU only. Per column the torch version pays
  ~25 µs of operator dispatch, most of the engine's time on a CPU; this one pays none.
`block_rounder` prepares one of them for a layer (the compiled one for CPU tensors when numba is installed).
"""
import numpy as np
import torch

from .alphabet import alphabet_midpoints, round_with_midpoints
from .threads import single_thread

try:  # numba is in requirements.txt; without it the engine still works, at torch-dispatch speed
    import numba
except ImportError:  # pragma: no cover - exercised only where numba is missing
    numba = None

# Up to this many midpoints the index is counted with one branch-free comparison per midpoint, which
# vectorizes over neurons; larger alphabets (8 bits and up) use a binary search per entry.
LINEAR_SEARCH_MAX_MIDPOINTS = 64


def block_coupling(quantized_gram):
    """From H_bb (G, B, B): 1/d (G, B), 0 for empty columns, and coupling (G, B, B) = H[j, t]/d_t for t > j."""
    norms2 = torch.diagonal(quantized_gram, dim1=1, dim2=2)
    # ||X̃_t|| = 0: the argument is 0 (its numerator is 0 too), so scale by 0 rather than 1/0.
    inverse = torch.where(norms2 > 0, 1.0 / torch.where(norms2 > 0, norms2, torch.ones_like(norms2)),
                          torch.zeros_like(norms2))
    # Row j of triu(H, 1) holds <X̃_j, X̃_t> for t > j; column t is scaled by 1/d_t.
    return inverse, torch.triu(quantized_gram, diagonal=1) * inverse.unsqueeze(1)


def round_block_torch(numerators, quantized_gram, alphabet, midpoints=None):
    """numerators (G, B, N1), quantized_gram (G, B, B), alphabet (L,) or (G, N1, L) -> q (G, B, N1).

    Three tensor operations per column (search, gather, update); `midpoints`: the alphabet's, if at hand.
    """
    midpoints = alphabet_midpoints(alphabet) if midpoints is None else midpoints
    with single_thread():
        inverse, coupling = block_coupling(quantized_gram)
        arguments = (numerators * inverse.unsqueeze(2)).transpose(0, 1).contiguous()  # (B, G, N1)
        coupling = coupling.permute(1, 2, 0).unsqueeze(-1)  # (B, B, G, 1): [j, t] broadcast over neurons
        rounded = []
        for t in range(arguments.shape[0]):
            q = round_with_midpoints(arguments[t], alphabet, midpoints)
            rounded.append(q)
            if t + 1 < arguments.shape[0]:
                arguments[t + 1:].addcmul_(coupling[t, t + 1:], q, value=-1.0)
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
    def _round_block_kernel(numerators, quantized_gram, levels, midpoints, rounded):
        """Left-looking: row t takes its corrections from the rows already rounded, then is rounded.

        numerators and rounded (G, B, N1); quantized_gram (G, B, B); levels (L, R), midpoints (L−1, R)
        with R = 1 (one alphabet) or G·N1 (one per neuron, column g·N1 + n).
        """
        n_groups, n_columns, n_neurons = numerators.shape
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
                # index = number of midpoints strictly below the value: ties go to the smaller level,
                # as torch.bucketize(…, right=False) in `round_to_alphabet`.
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


def compiled_available() -> bool:
    """Whether the compiled in-block kernel can run here (numba importable)."""
    return numba is not None


def block_rounder(alphabet, n_groups, n_neurons, compiled=None):
    """The in-block step for one layer: a function (numerators (G, B, N1), H_bb (G, B, B)) -> q (G, B, N1).

    alphabet (L,) or (G, N1, L), already in the compute dtype and on the device. `compiled`: None picks
    the numba kernel for CPU tensors when numba is installed, True / False force one implementation.
    """
    if compiled is None:
        compiled = numba is not None and alphabet.device.type == "cpu"
    if not compiled:
        midpoints = alphabet_midpoints(alphabet)
        return lambda numerators, quantized_gram: round_block_torch(numerators, quantized_gram, alphabet, midpoints)
    if numba is None:
        raise RuntimeError("the compiled in-block kernel needs numba (pip install numba)")
    if alphabet.device.type != "cpu":
        raise ValueError("the compiled in-block kernel runs on the CPU; use compiled=False on other devices")
    levels = alphabet.reshape(1, -1) if alphabet.dim() == 1 else alphabet.reshape(n_groups * n_neurons, -1)
    midpoints = alphabet_midpoints(levels)  # the thresholds of round_to_alphabet, in the same dtype
    levels, midpoints = levels.t().contiguous().numpy(), midpoints.t().contiguous().numpy()  # (L, R), (L−1, R)

    def round_block_compiled(numerators, quantized_gram):
        rounded = torch.empty(numerators.shape, dtype=numerators.dtype)
        _round_block_kernel(numerators.contiguous().numpy(), quantized_gram.contiguous().numpy(), levels,
                            midpoints, rounded.numpy())
        return rounded

    return round_block_compiled
