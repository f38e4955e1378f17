"""The order in which a GPFQ-family rule (GPFQ, SPFQ, sparse GPFQ, Qronos) walks a layer's input columns.

- "natural": t = 1 … N0, as the weight is laid out (the paper).
- "act_order": decreasing ||X̃_t||² (the diagonal of X̃ᵀX̃; ties keep the natural order), as GPTQ's
  act-order: the columns whose inputs carry the most energy are quantized first, while many
  columns are still left to absorb their error.

The rule runs on the permuted columns (W, X, X̃, or the Grams X̃ᵀX, X̃ᵀX̃ permuted on both sides) and
Q is mapped back to the original columns. Each rule does both itself (`rows_in_order` or `gram_in_order`,
then `restore_columns`), so the order adds no frame between a method and its engine. Shapes: W (G, N1, N0), rows (G, m, N0), Grams (G, N0, N0),
order (G, N0): one permutation per group.
"""
import torch

COLUMN_ORDERS = ("natural", "act_order")


def check_column_order(column_order: str) -> None:
    if column_order not in COLUMN_ORDERS:
        raise ValueError(f"column_order must be one of {COLUMN_ORDERS}, got {column_order!r}")


def act_order(quantized_norms2: torch.Tensor) -> torch.Tensor:
    """(G, N0) ||X̃_t||² -> (G, N0) column indices in decreasing order (stable)."""
    return torch.argsort(quantized_norms2, dim=1, descending=True, stable=True)


def order_from_rows(quantized_input: torch.Tensor) -> torch.Tensor:
    """act-order of rows X̃ (G, m, N0), the norms summed in float64."""
    return act_order(quantized_input.detach().double().pow(2).sum(dim=1))


def order_from_gram(quantized_gram: torch.Tensor) -> torch.Tensor:
    """act-order from X̃ᵀX̃ (G, N0, N0): its diagonal."""
    return act_order(torch.diagonal(quantized_gram, dim1=1, dim2=2))


def permute_columns(tensor: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """tensor (G, K, N0) with its last axis in `order` (G, N0)."""
    return tensor.gather(2, order.to(tensor.device).unsqueeze(1).expand_as(tensor))


def permute_gram(gram: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """A Gram (G, N0, N0) with rows and columns in `order`."""
    order = order.to(gram.device)
    batch = torch.arange(gram.shape[0], device=gram.device)[:, None, None]
    return gram[batch, order.unsqueeze(2), order.unsqueeze(1)]


def restore_columns(quantized_weight: torch.Tensor, order) -> torch.Tensor:
    """Q (G, N1, N0) computed on permuted columns, back in the original column order (order None: Q as it is)."""
    if order is None:
        return quantized_weight
    restored = torch.empty_like(quantized_weight)
    restored.scatter_(2, order.to(quantized_weight.device).unsqueeze(1).expand_as(quantized_weight),
                      quantized_weight)
    return restored


def rows_in_order(column_order: str, weight, analog_input, quantized_input):
    """(order, W, X, X̃) with the columns in `column_order`; order None, the tensors as given, for "natural"."""
    check_column_order(column_order)
    if column_order == "natural":
        return None, weight, analog_input, quantized_input
    order = order_from_rows(quantized_input)
    return (order, permute_columns(weight, order), permute_columns(analog_input, order),
            permute_columns(quantized_input, order))


def gram_in_order(column_order: str, weight, cross, quantized_gram):
    """(order, W, X̃ᵀX, X̃ᵀX̃) with the columns in `column_order`; order None, the tensors as given, for "natural"."""
    check_column_order(column_order)
    if column_order == "natural":
        return None, weight, cross, quantized_gram
    order = order_from_gram(quantized_gram)
    return order, permute_columns(weight, order), permute_gram(cross, order), permute_gram(quantized_gram, order)
