"""gpfq.quantize as a new user calls it: the caller's model comes back as it went in; models of dict, tuple and
several inputs; recurrent layers in the coverage; a DataLoader shorter than m; an fp16 model on fp32 data; the
README's snippet without a warning."""
import re
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

import gpfq
from gpfq.errors import BadHyperparameterError, BadInputError
from gpfq.paths import REPO_ROOT


def quiet(*args, **kwargs):
    return gpfq.quantize(*args, log=lambda line: None, **kwargs)


def _rows(n, width, seed):
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


class OnKey(nn.Module):
    """A model called as model(x=…)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.left, self.right = nn.Linear(6, 4), nn.Linear(5, 4)

    def forward(self, a, b):
        return self.left(a) + self.right(b)


def _weights(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


# ---------------------------------------------------------------- 1. the caller's model comes back as it went in
@pytest.mark.parametrize("in_place", [False, True])
def test_the_callers_modes_are_restored(in_place):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.5), nn.BatchNorm1d(8), nn.Linear(8, 3)).train()
    model[2].eval()  # a mixed model: the BatchNorm frozen, the rest training
    before = [m.training for m in model.modules()]
    float_weights = _weights(model)
    result = quiet(model, _rows(40, 6, 1), gpfq.QuantConfig(batch_size=16), in_place=in_place)
    assert [m.training for m in model.modules()] == before == [True, True, True, False, True]
    changed = [name for name, w in _weights(model).items() if not torch.equal(w, float_weights[name])]
    assert changed == (["0.weight", "3.weight"] if in_place else [])  # in place: exactly the quantized weights
    assert (result.model is model) == in_place
    if not in_place:  # the copy is the one quantize ran: in eval mode
        assert not any(m.training for m in result.model.modules())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU to move the model to")
def test_the_callers_device_is_restored():
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    parameters = list(model.parameters())
    result = quiet(model, _rows(40, 6, 1), gpfq.QuantConfig(batch_size=16), device="cuda", in_place=True)
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert all(a is b for a, b in zip(parameters, model.parameters()))  # the same Parameter objects
    assert result.model is model


# ---------------------------------------------------------------- 2. dict inputs, passed as model(**x)
def _plain_and_keyword_results(keyword_data, loader=False):
    torch.manual_seed(3)
    model = OnKey()
    x = _rows(40, 6, 2)
    config = gpfq.QuantConfig(batch_size=16, engine="columns")
    plain = quiet(model, DataLoader(TensorDataset(x), batch_size=8) if loader else x, config)
    keyword = quiet(model, keyword_data(x), config)
    return plain, keyword


@pytest.mark.parametrize("form", ["dict items", "(dict, label) items", "a dict of tensors", "a loader of dicts"])
def test_dict_inputs_give_what_the_same_tensors_give(form):
    """The same images as {"x": image} give the same quantized model, bit for bit, as the bare tensors (the same
    seeded draw; model(x=…) computes what model(…) does)."""
    keyword_data = {"dict items": lambda x: [{"x": row} for row in x],
                    "(dict, label) items": lambda x: [({"x": row}, 7) for row in x],
                    "a dict of tensors": lambda x: {"x": x},
                    "a loader of dicts": lambda x: DataLoader([{"x": row} for row in x], batch_size=8)}[form]
    plain, keyword = _plain_and_keyword_results(keyword_data, loader=form == "a loader of dicts")
    assert [r.name for r in keyword.reports] == ["fc1", "fc2"]
    for name, weight in _weights(plain.model).items():
        assert torch.equal(_weights(keyword.model)[name], weight), name
    assert [r.relative_error for r in keyword.reports] == [r.relative_error for r in plain.reports]


def test_a_dict_with_a_wrong_key_is_one_clear_error_before_work():
    lines = []
    with pytest.raises(BadInputError, match=r"the model cannot be run on one calibration input, a dict \("
                                            r"y=\(1, 6\)\): it raised TypeError: .*unexpected keyword argument 'y'"):
        gpfq.quantize(OnKey(), {"y": _rows(40, 6, 2)}, gpfq.QuantConfig(batch_size=16), log=lines.append)
    assert lines == []


# ---------------------------------------------------------------- 3. two tensor inputs
@pytest.mark.parametrize("form", ["((a, b), y) in a loader", "{'a': a, 'b': b}"])
def test_two_inputs_each_layer_quantized_from_its_own_input(form):
    """The two branches are independent, so each layer's X̃ = X is its own input: Q must be quantize_layer's on
    those rows (a loader in order and fixed calibration of all 32 images: the rows in order)."""
    torch.manual_seed(4)
    model = TwoInputs()
    a, b = _rows(32, 6, 5), _rows(32, 5, 6)
    config = gpfq.QuantConfig(batch_size=32, calibration="fixed", engine="columns")
    data = (DataLoader([((x, y), 0) for x, y in zip(a, b)], batch_size=8) if form.startswith("((")
            else {"a": a, "b": b})
    result = quiet(model, data, config)
    assert [r.name for r in result.reports] == ["left", "right"]
    for name, rows in (("left", a), ("right", b)):
        weight = model.get_submodule(name).weight.detach()
        expected = gpfq.quantize_layer(weight, rows, rows, config)
        assert torch.equal(result.model.get_submodule(name).weight.detach(), expected), name
        assert not torch.equal(expected, weight)


def test_two_inputs_given_as_x_and_label_is_one_clear_error_before_work():
    """TensorDataset(a, b) reads as (x, y): the model gets only a; the message says how to give both."""
    lines = []
    with pytest.raises(BadInputError) as caught:
        gpfq.quantize(TwoInputs(), TensorDataset(_rows(32, 6, 5), _rows(32, 5, 6)), gpfq.QuantConfig(batch_size=16),
                      log=lines.append)
    message = str(caught.value)
    assert message.startswith("the model cannot be run on one calibration input, a tensor (1, 6): it raised "
                              "TypeError: ")
    assert "missing 1 required positional argument: 'b'" in message
    assert "for a model of several inputs give items ((a, b), y) or {'a': a, 'b': b}" in message
    assert lines == []


@pytest.mark.parametrize("data, message", [
    ({"a": _rows(40, 6, 5), "b": _rows(30, 5, 6)},
     "the tensors of one calibration batch have different first (batch) dimensions: a dict (a=(40, 6), b=(30, 5))"),
    ([{"a": row, "b": "text"} for row in _rows(40, 6, 5)],
     "the calibration inputs, a dict (a=(6,), b=str), are not all tensors; a calibration item is x or (x, y, …)"),
    (["text"] * 40, "calibration inputs of type str cannot be batched; a calibration item is x or (x, y, …)")])
def test_inputs_that_cannot_be_batched_are_one_clear_error(data, message):
    with pytest.raises(BadInputError, match=re.escape(message)):
        quiet(TwoInputs(), data, gpfq.QuantConfig(batch_size=16))


# ---------------------------------------------------------------- 4. recurrent layers in the coverage
class Recurrent(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.rnn = getattr(nn, kind)(8, 16, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


@pytest.mark.parametrize("kind, gates", [("LSTM", 4), ("GRU", 3), ("RNN", 1)])
def test_recurrent_weights_count_as_float_matmul_weights(kind, gates):
    torch.manual_seed(0)
    data = torch.randn(40, 5, 8)
    recurrent = gates * 16 * (8 + 16)  # weight_ih_l0 (gates·H, I) and weight_hh_l0 (gates·H, H)
    fraction = recurrent / (recurrent + 3 * 16)
    with pytest.warns(UserWarning, match=rf"{fraction:.1%} of this model's matmul parameters cannot be quantized "
                                         rf"and stay float .*rnn\.weight_hh_l0 \(recurrent weight of {kind}"):
        result = quiet(Recurrent(kind), data, gpfq.QuantConfig(batch_size=16))
    assert sorted(name for name, _, _ in result.coverage.unsupported) == ["rnn.weight_hh_l0", "rnn.weight_ih_l0"]
    assert result.coverage.unsupported_fraction == pytest.approx(fraction)
    assert [r.name for r in result.reports] == ["head"]
    with pytest.raises(BadHyperparameterError, match="strict_coverage: "):
        quiet(Recurrent(kind), data, gpfq.QuantConfig(batch_size=16, strict_coverage=True))


# ---------------------------------------------------------------- 5. a DataLoader shorter than m
def test_a_loader_shorter_than_m_is_refused_before_work():
    lines = []
    loader = DataLoader(TensorDataset(_rows(10, 6, 1)), batch_size=4)
    with pytest.raises(BadHyperparameterError, match=re.escape(
            "bad hyperparameter: batch_size 16 is larger than the calibration DataLoader (10 images in one pass), "
            "so one draw would repeat images; give at least 16 images or lower batch_size")):
        gpfq.quantize(OnKey(), loader, gpfq.QuantConfig(batch_size=16), log=lines.append)
    assert lines == []
    dropped = DataLoader(TensorDataset(_rows(10, 6, 1)), batch_size=4, drop_last=True)  # 8 images a pass
    with pytest.raises(BadHyperparameterError, match=r"DataLoader \(8 images in one pass\)"):
        quiet(OnKey(), dropped, gpfq.QuantConfig(batch_size=9))
    assert [r.rows for r in quiet(OnKey(), dropped, gpfq.QuantConfig(batch_size=8)).reports] == [8, 8]


class Stream(IterableDataset):
    """Rows of unknown length (no __len__)."""

    def __init__(self, rows):
        self.rows = rows

    def __iter__(self):
        return iter(self.rows)


def test_an_iterable_loader_found_short_is_refused_at_its_end():
    with pytest.raises(BadHyperparameterError, match=re.escape(
            "batch_size 16 is larger than the calibration DataLoader (10 images in one pass)")):
        quiet(OnKey(), DataLoader(Stream(_rows(10, 6, 1)), batch_size=4), gpfq.QuantConfig(batch_size=16))
    long_enough = quiet(OnKey(), DataLoader(Stream(_rows(16, 6, 1)), batch_size=4), gpfq.QuantConfig(batch_size=16))
    assert [r.rows for r in long_enough.reports] == [16, 16]


# ---------------------------------------------------------------- 6. an fp16 model on fp32 data
def test_an_fp16_model_on_fp32_data_is_quantized_on_the_data_cast_to_fp16():
    torch.manual_seed(3)
    model = OnKey().half()
    x = _rows(40, 6, 2)
    lines = []
    result = gpfq.quantize(model, x, gpfq.QuantConfig(batch_size=16), log=lines.append)
    assert "note: the calibration inputs are torch.float32 and the model is torch.float16: the inputs are cast to " \
           "torch.float16" in lines
    expected = quiet(model, x.half(), gpfq.QuantConfig(batch_size=16))  # what the caller's own cast gives
    for name, weight in _weights(expected.model).items():
        assert weight.dtype == torch.float16 and torch.equal(_weights(result.model)[name], weight), name
    assert [r.name for r in result.reports] == ["fc1", "fc2"]


# ---------------------------------------------------------------- 7. the README's snippet, as written
def test_readme_snippet_runs_without_a_warning():
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme[readme.index("## Your own model"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    run = subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=REPO_ROOT)
    assert run.returncode == 0, run.stderr
    printed = run.stdout + run.stderr
    assert re.findall(r"^\S+ 0\.\d+$", run.stdout, re.M)  # the snippet's own lines: a name, a relative error
    assert "warning" not in printed.lower(), printed
