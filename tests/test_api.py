"""gpfq.quantize and gpfq.quantize_layer on models and data built here, as a user would call them."""
import os
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gpfq
from gpfq.methods.alphabet import layer_radius, make_alphabet
from gpfq.methods.gpfq.reference import gpfq_reference


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, stride=2), nn.ReLU())
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 5 * 5, 16), nn.ReLU(), nn.Linear(16, 4))

    def forward(self, x):
        return self.head(self.features(x))


LAYERS = ["features.0", "features.3", "head.1", "head.3"]


def _model(seed=0):
    torch.manual_seed(seed)
    return SmallCNN().eval()


def _images(n=48, seed=1):
    return torch.randn(n, 3, 12, 12, generator=torch.Generator().manual_seed(seed))


def _levels(config, weight, conv):
    scalar = config.cnn_scalar if conv else config.mlp_scalar
    percentile = config.cnn_percentile if conv else config.mlp_percentile
    return make_alphabet(config.alphabet, config.bits, scalar, layer_radius(weight.reshape(weight.shape[0], -1),
                                                                            percentile), config.include_0)


def _on_alphabet(weight, levels):
    return bool(torch.isin(weight.detach(), levels.to(weight.dtype)).all())


def test_quantize_a_user_cnn_on_user_tensors():
    model = _model()
    config = gpfq.QuantConfig(bits=3, batch_size=16)
    lines = []
    result = gpfq.quantize(model, _images(), config, log=lines.append)
    assert [r.name for r in result.reports] == LAYERS
    layer_lines = [line for line in lines if line.startswith("[")]
    assert [line.split()[1] for line in layer_lines] == LAYERS  # one printed line per layer, with its error
    assert all("rel. error" in line for line in layer_lines)
    assert lines[-1].startswith(f"coverage: {len(LAYERS)} of {len(LAYERS)} matmul weights quantized")
    for report in result.reports:
        assert 0 < report.relative_error < 1 and report.bits == 3 and report.levels == 2 ** 3 + 1
        quantized = result.model.get_submodule(report.name).weight
        analog = model.get_submodule(report.name).weight
        assert _on_alphabet(quantized, _levels(config, analog, analog.dim() == 4))
        assert not torch.equal(quantized, analog)  # the user's model is left float
    assert result.relative_errors == {r.name: r.relative_error for r in result.reports}


def test_tensor_dataset_and_loader_give_the_same_as_the_bare_tensor():
    images, labels = _images(), torch.arange(48) % 4
    config = gpfq.QuantConfig(batch_size=16, seed=3)
    quiet = dict(log=lambda line: None)
    bare = gpfq.quantize(_model(), images, config, **quiet)
    with_labels = gpfq.quantize(_model(), TensorDataset(images, labels), config, **quiet)
    for name in LAYERS:
        assert torch.equal(bare.model.get_submodule(name).weight, with_labels.model.get_submodule(name).weight)
    # a DataLoader is read in its own order: an unshuffled loader of x or (x, y) batches gives one result
    loader_x = gpfq.quantize(_model(), DataLoader(images, batch_size=10), config, **quiet)
    loader_xy = gpfq.quantize(_model(), DataLoader(TensorDataset(images, labels), batch_size=7), config, **quiet)
    for name in LAYERS:
        assert torch.equal(loader_x.model.get_submodule(name).weight, loader_xy.model.get_submodule(name).weight)


def test_layers_select_and_override():
    config = gpfq.QuantConfig(bits=4, batch_size=16)
    model = _model()
    result = gpfq.quantize(model, _images(), config, layers={0: None, "head.*": 2, -1: {"method": "msq", "bits": 5}},
                           log=lambda line: None)
    assert {r.name: (r.bits, r.levels) for r in result.reports} == {
        "features.3": (4, 17), "head.1": (2, 5), "head.3": (5, 33)}
    assert torch.equal(result.model.features[0].weight, model.features[0].weight)  # left float
    only = gpfq.quantize(model, _images(), config, layers=["head.3"], log=lambda line: None)
    assert [r.name for r in only.reports] == ["head.3"]
    with pytest.raises(ValueError, match=r"layers entries \['nothing\*'\] match no layer"):
        gpfq.quantize(model, _images(), config, layers={"nothing*": 3})
    with pytest.raises(ValueError, match="cannot differ between layers"):
        gpfq.quantize(model, _images(), config, layers={0: {"batch_size": 8}})


def test_in_place_and_fold_batchnorm():
    model = _model()
    folded = gpfq.quantize(model, _images(), gpfq.QuantConfig(batch_size=16, fold_batchnorm=True),
                           log=lambda line: None)
    assert isinstance(folded.model.features[1], nn.Identity) and isinstance(model.features[1], nn.BatchNorm2d)
    result = gpfq.quantize(model, _images(), gpfq.QuantConfig(batch_size=16), in_place=True, log=lambda line: None)
    assert result.model is model
    with pytest.raises(ValueError, match="in_place=True with fold_batchnorm=True: folding returns a new model"):
        gpfq.quantize(_model(), _images(), gpfq.QuantConfig(batch_size=16, fold_batchnorm=True), in_place=True)


def test_bad_calibration_data_is_refused_before_work():
    with pytest.raises(ValueError, match="batch_size 64 is larger than the calibration set"):
        gpfq.quantize(_model(), _images(48), gpfq.QuantConfig(batch_size=64))
    with pytest.raises(TypeError, match="calibration_data must be"):
        gpfq.quantize(_model(), 3.0)
    with pytest.raises(TypeError, match="config must be a gpfq.QuantConfig"):
        gpfq.quantize(_model(), _images(), {"bits": 3})


@pytest.mark.parametrize("engine", ["auto", "residual", "gram", "columns"])
def test_quantize_layer_against_the_per_column_reference(engine):
    generator = torch.Generator().manual_seed(5)
    weight = torch.randn(6, 30, generator=generator)
    analog = torch.randn(80, 30, generator=generator)
    quantized = analog + 0.05 * torch.randn(80, 30, generator=generator)
    config = gpfq.QuantConfig(bits=3, mlp_scalar=1.2, engine=engine)
    levels = _levels(config, weight, conv=False)
    expected = gpfq_reference(weight, analog, quantized, levels).float()
    result = gpfq.quantize_layer(weight, analog, quantized, config)
    assert result.shape == weight.shape and _on_alphabet(result, levels)
    assert (result == expected).float().mean() >= 0.99  # float32 against float64: a rare near-tie may differ


def test_quantize_layer_conv_weight_uses_cnn_values():
    generator = torch.Generator().manual_seed(6)
    weight = torch.randn(4, 2, 3, 3, generator=generator)
    rows = torch.randn(50, 18, generator=generator)
    config = gpfq.QuantConfig(bits=2, cnn_scalar=0.9, mlp_scalar=2.0, method="msq")
    result = gpfq.quantize_layer(weight, rows, rows, config)
    assert result.shape == weight.shape and _on_alphabet(result, _levels(config, weight, conv=True))
    with pytest.raises(ValueError, match=r"analog_rows must be \(m, 18\)"):
        gpfq.quantize_layer(weight, rows[:, :9], rows, config)


@pytest.mark.parametrize("engine", ["auto", "gram"])  # the default (residual at this m) and the streamed Gram form
def test_default_path_from_quantize_to_the_kernel_is_at_most_five_frames(default_data, monkeypatch, engine):
    """gpfq.quantize → the layer loop → the method's rule → the engine form → the in-block kernel: at most five of
    gpfq's frames (docs/design.md), counted at every kernel call of a default run; a layer of indirection fails."""
    from gpfq.methods.gpfq import inblock
    package = os.path.dirname(gpfq.__file__) + os.sep
    paths = set()

    def spy(kernel):
        def called(*arguments):
            frames, frame = [], sys._getframe(1)
            while frame is not None:
                if frame.f_code.co_filename.startswith(package):
                    frames.append(f"{frame.f_code.co_filename[len(package):]}:{frame.f_code.co_name}")
                frame = frame.f_back
            paths.add(tuple(reversed(frames)) + ("kernel",))
            return kernel(*arguments)
        return called

    # whichever kernel the engine takes (the compiled one on the CPU, else the torch one)
    monkeypatch.setattr(inblock, "_round_block_kernel", spy(inblock._round_block_kernel))
    monkeypatch.setattr(inblock, "round_block_torch", spy(inblock.round_block_torch))
    calibration, _, model = default_data
    result = gpfq.quantize(model, calibration, gpfq.QuantConfig(batch_size=32, engine=engine), log=lambda line: None)
    assert engine == "auto" or {report.form for report in result.reports} == {engine}
    assert paths  # every layer ran through the kernel
    for path in paths:
        assert path[0] == "api.py:quantize" and len(path) <= 5, " → ".join(path)
