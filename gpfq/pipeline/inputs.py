"""Model inputs that are not one tensor: several positional tensors (a tuple) or keyword tensors (a dict).

A calibration item is x or (x, y, …) (y unused). x may be a tensor, run as model(x); a tuple or list of tensors,
run as model(*x); or a dict of tensors, run as model(**x). A plain tensor stays a tensor all the way, so the
single-input path is untouched; the other forms travel as `ModelInputs`, which slices, moves and counts its
rows like a batch tensor, so the streams and the capture handle both the same way.
"""
import torch

from gpfq.errors import CalibrationInputError

SUPPORTED = ("a calibration item is x or (x, y, …) with x a tensor (model(x)), a tuple of tensors (model(*x)) or "
             "a dict of tensors (model(**x)); for a model of several inputs give items ((a, b), y) or "
             "{'a': a, 'b': b}")


class ModelInputs:
    """A batch of a model's positional `args` and keyword `kwargs` tensors, all with the same first dimension."""

    def __init__(self, args=(), kwargs=None):
        self.args, self.kwargs = tuple(args), dict(kwargs or {})
        leaves = self._leaves()
        if not leaves or not all(isinstance(leaf, torch.Tensor) for leaf in leaves):
            raise CalibrationInputError(f"the calibration inputs, {describe(self)}, are not all tensors; {SUPPORTED}")

    def _leaves(self):
        return list(self.args) + list(self.kwargs.values())

    def map(self, function) -> "ModelInputs":
        return ModelInputs([function(a) for a in self.args], {k: function(v) for k, v in self.kwargs.items()})

    @property
    def shape(self) -> tuple:
        """(batch size,): what the streams read as `shape[0]`; CalibrationInputError if the tensors disagree."""
        sizes = {leaf.shape[0] if leaf.dim() else None for leaf in self._leaves()}
        if len(sizes) != 1 or None in sizes:
            raise CalibrationInputError(f"the tensors of one calibration batch have different first (batch) "
                                        f"dimensions: {describe(self)}")
        return (sizes.pop(),)

    def __getitem__(self, index):
        return self.map(lambda leaf: leaf[index])

    def unsqueeze(self, dim: int) -> "ModelInputs":
        return self.map(lambda leaf: leaf.unsqueeze(dim))

    def to(self, *args, **kwargs) -> "ModelInputs":
        return self.map(lambda leaf: leaf.to(*args, **kwargs))


def as_inputs(x):
    """The inputs x of a calibration item or batch as a tensor or ModelInputs; CalibrationInputError otherwise."""
    if isinstance(x, (torch.Tensor, ModelInputs)):
        return x
    if isinstance(x, dict):
        return ModelInputs(kwargs=x)
    if isinstance(x, (tuple, list)):
        return ModelInputs(args=x)
    raise CalibrationInputError(f"calibration inputs of type {type(x).__name__} cannot be batched; {SUPPORTED}")


def cat(parts: list):
    """Batches (tensors, or ModelInputs of one structure) joined along the batch dimension."""
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(parts)
    first = parts[0]
    return ModelInputs([torch.cat([p.args[i] for p in parts]) for i in range(len(first.args))],
                       {k: torch.cat([p.kwargs[k] for p in parts]) for k in first.kwargs})


def run(model, x):
    """model(x), model(*args, **kwargs) for ModelInputs."""
    if isinstance(x, ModelInputs):
        return model(*x.args, **x.kwargs)
    return model(x)


def floating_dtype(model):
    """The dtype of the model's first floating-point parameter (what float inputs are cast to), or None."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


def move(x, device, dtype=None):
    """x on `device`, its floating-point tensors cast to `dtype` (None: kept); a no-op copy-wise when nothing changes."""
    def one(tensor):
        if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
            return tensor.to(device=device, dtype=dtype)
        return tensor.to(device)
    return x.map(one) if isinstance(x, ModelInputs) else one(x)


def dtypes(x) -> set:
    """The dtypes of x's floating-point tensors."""
    leaves = x._leaves() if isinstance(x, ModelInputs) else [x]
    return {leaf.dtype for leaf in leaves if leaf.is_floating_point()}


def describe(x) -> str:
    """x as a message shows it: 'a tensor (1, 3, 8, 8)', 'a tuple ((1, 4), (1, 4))', 'a dict (a=(1, 4))'."""
    def shape(value):
        return str(tuple(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__
    if isinstance(x, torch.Tensor):
        return f"a tensor {shape(x)}"
    if isinstance(x, ModelInputs):
        parts = [shape(a) for a in x.args] + [f"{k}={shape(v)}" for k, v in x.kwargs.items()]
        return f"{'a dict' if x.kwargs and not x.args else 'a tuple'} ({', '.join(parts)})"
    return type(x).__name__


def placeholder_values(placeholders, x) -> dict:
    """{fx placeholder: value} for a traced forward(...) run on x: positional values in order, keyword ones by
    name; the other arguments keep their defaults."""
    args, kwargs = (x.args, x.kwargs) if isinstance(x, ModelInputs) else ((x,), {})
    values = {}
    for position, node in enumerate(placeholders):
        name = node.target.lstrip("*")
        if position < len(args):
            values[node] = args[position]
        elif name in kwargs:
            values[node] = kwargs[name]
        else:
            values[node] = node.args[0] if node.args else None
    return values


@torch.no_grad()
def check_model_runs(model, example) -> None:
    """Run the model once on one calibration input; CalibrationInputError saying what it was given if it fails,
    before any work (a raw traceback from deep inside the model says little about the input)."""
    try:
        run(model, example)
    except Exception as error:  # whatever the model raises on an input it cannot take
        raise CalibrationInputError(f"the model cannot be run on one calibration input, {describe(example)}: it "
                                    f"raised {type(error).__name__}: {error}. {SUPPORTED[0].upper()}{SUPPORTED[1:]}"
                                    ) from error
