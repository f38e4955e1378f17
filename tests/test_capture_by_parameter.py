"""Capture by parameter: the rows are what each op multiplies the weight with, for any padding and any caller.

Each padding case checks rows @ Wᵀ (+ bias) against the convolution's real output at the sampled positions,
and that the sampled grid covers the real output grid.
"""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from gpfq import QuantConfig
from gpfq.pipeline.cached_forward import trace_graph
from gpfq.pipeline.capture import capture_uses
from gpfq.pipeline.coverage import Coverage
from gpfq.pipeline.discovery import find_layers
from gpfq.pipeline.rows import layer_rows, patch_grid, patch_indices
from gpfq.pipeline.streams import CalibrationStream
from gpfq.pipeline.network import Calibration, Hooks, layer_alphabet, quantize_network


def tf_same_pads(height, width, kernel, stride):
    """TensorFlow's 'SAME' padding (left, right, top, bottom): the odd one after."""
    pads = []
    for size in (width, height):
        total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
        pads += [total // 2, total - total // 2]
    return pads


class TFPadConv(nn.Module):
    """A convolution ported from TensorFlow: 'SAME' padding done by F.pad in forward, then padding=0.
    Pads computed from each input (fx cannot trace that), or fixed for one input size (fx can)."""

    def __init__(self, stride, channels=3, size=None):
        super().__init__()
        self.conv = nn.Conv2d(channels, 4, 3, stride=stride, padding=0)
        self.pads = tf_same_pads(*size, 3, stride) if size else None

    def forward(self, x):
        pads = self.pads or tf_same_pads(x.shape[2], x.shape[3], 3, self.conv.stride[0])
        return self.conv(F.pad(x, pads))


class PaddingConv2d(nn.Conv2d):
    """A Conv2d subclass that pads (asymmetrically) in its own forward."""

    def forward(self, x):
        return super().forward(F.pad(x, (0, 1, 0, 1)))


class Wrap(nn.Module):
    def __init__(self, conv):
        super().__init__()
        self.conv = conv

    def forward(self, x):
        return self.conv(x)


def padding_cases():
    return {
        "tf_pad_stride1": TFPadConv(1),
        "tf_pad_stride2": TFPadConv(2),
        "reflect": Wrap(nn.Conv2d(3, 4, 3, padding=2, padding_mode="reflect")),
        "replicate": Wrap(nn.Conv2d(3, 4, 3, stride=2, padding=1, padding_mode="replicate")),
        "circular": Wrap(nn.Conv2d(3, 4, (3, 5), padding=(1, 2), padding_mode="circular")),
        "same_even_kernel": Wrap(nn.Conv2d(3, 4, 4, padding="same")),
        "same_even_dilated": Wrap(nn.Conv2d(3, 4, (2, 4), padding="same", dilation=(3, 1))),
        "subclass_pads_in_forward": Wrap(PaddingConv2d(3, 4, 2, stride=2)),
        "conv1d_reflect": Wrap(nn.Conv1d(3, 4, 3, stride=2, padding=1, padding_mode="reflect")),
        "conv1d_same_even": Wrap(nn.Conv1d(3, 4, 4, padding="same")),
        "conv3d": Wrap(nn.Conv3d(3, 4, 2, stride=(1, 2, 2), padding=(1, 0, 1))),
    }


def _images(model, n=2):
    conv = model.conv
    if isinstance(conv, nn.Conv1d):
        return torch.randn(n, 3, 13)
    if isinstance(conv, nn.Conv3d):
        return torch.randn(n, 3, 5, 7, 6)
    return torch.randn(n, 3, 14, 13)


def _positions(index, grid):
    """Grid coordinates (n, k, dims) of the flat patch indices (n, k)."""
    coordinates, rest = [], index
    for size in reversed(grid[1:]):
        coordinates.insert(0, rest % size)
        rest = rest // size
    coordinates.insert(0, rest)
    return torch.stack(coordinates, dim=-1)


@pytest.mark.parametrize("case", list(padding_cases()))
@pytest.mark.parametrize("patch_stride,retain_rate", [("layer", 1.0), ("layer", 0.3), ("kernel", 1.0)])
def test_rows_are_what_the_convolution_multiplies(case, patch_stride, retain_rate):
    torch.manual_seed(0)
    model = padding_cases()[case].eval()
    images = _images(model)
    (layer,) = find_layers(model, images[:1]).layers
    captured = capture_uses(model, layer, images)
    (use,) = captured.uses
    rows, _ = layer_rows(layer, captured, captured, retain_rate, torch.Generator().manual_seed(3), patch_stride)
    with torch.no_grad():
        output = model(images)  # (n, C_out, *out_spatial)
        got = rows @ model.conv.weight.reshape(4, -1).T + model.conv.bias
    out_spatial, dims = output.shape[2:], len(use.geometry.kernel_size)
    grid = patch_grid(use.geometry, use.input.shape[2:], patch_stride)
    index = patch_indices(images.shape[0], math.prod(grid), retain_rate, torch.Generator().manual_seed(3))
    positions = _positions(index, grid).reshape(-1, dims)  # grid coordinates of each row
    image_of_row = torch.arange(images.shape[0]).repeat_interleave(index.shape[1])
    channels_last = output.movedim(1, -1)
    if patch_stride == "layer":
        assert tuple(grid) == tuple(out_spatial)  # the sampled grid is the real output grid
        torch.testing.assert_close(got, channels_last[(image_of_row, *positions.T)], rtol=1e-4, atol=1e-5)
        return
    # kernel-stride patches: patch i starts at input offset i·kernel, which is output position i·kernel / stride
    stride = torch.tensor(use.geometry.stride)
    offsets = positions * torch.tensor(use.geometry.kernel_size)
    on_output = (offsets % stride == 0).all(dim=-1) & (offsets // stride < torch.tensor(out_spatial)).all(dim=-1)
    assert on_output.any()
    expected = channels_last[(image_of_row[on_output], *(offsets[on_output] // stride).T)]
    torch.testing.assert_close(got[on_output], expected, rtol=1e-4, atol=1e-5)
    # and they tile the whole padded input: the last one reaches the window of the last output position
    for n_patches, size, kernel, step in zip(grid, out_spatial, use.geometry.kernel_size, use.geometry.stride):
        assert (size - 1) * step < (n_patches - 1) * kernel + kernel


@pytest.mark.parametrize("calibration", ["fresh", "fixed"])
def test_padding_subclass_and_tf_padding_quantize_in_both_modes(calibration):
    """A Conv2d subclass that pads in forward is found and quantized in fixed mode too (it used to fail there)."""
    torch.manual_seed(0)
    model = nn.Sequential(PaddingConv2d(3, 4, 2, stride=2), nn.ReLU(), TFPadConv(1, channels=4, size=(6, 6))).eval()
    data = TensorDataset(torch.randn(6, 3, 12, 12), torch.zeros(6, dtype=torch.long))
    settings = QuantConfig(bits=4, mlp_scalar=1.3, cnn_scalar=1.3)
    quantized, reports = quantize_network(model, CalibrationStream(data, 0, chunk_size=3), lambda i, n, l: settings,
                                          Calibration(6, 0.5, 0, mode=calibration), Hooks(log=lambda *a: None))
    assert [r.name for r in reports] == ["0", "2.conv"]
    for report in reports:
        alphabet, _ = layer_alphabet(find_layers(model, data.tensors[0][:1]).layers[report.index], settings)
        weight = quantized.get_submodule(report.name).weight.detach()
        assert torch.isin(weight.double(), alphabet.float().double()).all()
        assert 0 < report.relative_error < 0.5


# ---------------------------------------------------------------- attention, functional calls, sharing
class FunctionalBlock(nn.Module):
    """Like torchvision's Swin attention: module weights passed to functions; plus x @ W and x @ W.T."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(6, 6)
        self.right = nn.Parameter(torch.randn(6, 5) / 3)  # x @ right: stored (N0, N1)
        self.left = nn.Parameter(torch.randn(4, 5) / 3)  # x @ left.T: stored (N1, N0)

    def forward(self, x):
        h = F.gelu(F.linear(x, self.qkv.weight, self.qkv.bias))
        return (h @ self.right) @ self.left.T


def test_functional_and_matmul_weights_are_layers_with_their_real_rows():
    torch.manual_seed(0)
    model = FunctionalBlock().eval()
    x = torch.randn(3, 2, 6)
    layers = find_layers(model, x[:1]).layers
    assert [(l.name, l.input_major) for l in layers] == [("qkv", False), ("right", True), ("left", False)]
    h = F.gelu(model.qkv(x))
    for layer, expected in zip(layers, [x, h, h @ model.right]):
        captured = capture_uses(model, layer, x)
        rows, _ = layer_rows(layer, captured, captured, 1.0, torch.Generator())
        torch.testing.assert_close(rows, expected.reshape(-1, expected.shape[-1]).detach())
    data = TensorDataset(torch.randn(8, 2, 6), torch.zeros(8, dtype=torch.long))
    settings = QuantConfig(bits=4, mlp_scalar=1.3, cnn_scalar=1.3)
    for calibration in ("fresh", "fixed"):
        quantized, reports = quantize_network(model, CalibrationStream(data, 0, chunk_size=4),
                                              lambda i, n, l: settings, Calibration(8, 1.0, 0, mode=calibration),
                                              Hooks(log=lambda *a: None))
        assert len(reports) == 3
        right = quantized.right.detach()
        alphabet, _ = layer_alphabet(layers[1], settings)
        assert torch.isin(right.double(), alphabet.float().double()).all()
        # the stored (N0, N1) weight is quantized per output column, like a Linear's rows
        assert not torch.equal(right, model.right.detach())


def test_multihead_attention_projections_are_linear_layers():
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(8, 2, batch_first=True).eval()

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = attention

        def forward(self, x):
            return self.attention(x, x, x, need_weights=False)[0]

    model = Block().eval()
    x = torch.randn(3, 5, 8)
    layers = find_layers(model, x[:1]).layers
    assert [l.name for l in layers] == ["attention.in_proj_weight", "attention.out_proj"]
    in_proj, out_proj = (capture_uses(model, layer, x) for layer in layers)
    rows_in, _ = layer_rows(layers[0], in_proj, in_proj, 1.0, torch.Generator())
    torch.testing.assert_close(rows_in, x.transpose(0, 1).reshape(-1, 8))  # MHA runs (L, N, E)
    rows_out, _ = layer_rows(layers[1], out_proj, out_proj, 1.0, torch.Generator())
    with torch.no_grad():
        expected = model(x).transpose(0, 1).reshape(-1, 8)
        torch.testing.assert_close(rows_out @ attention.out_proj.weight.T + attention.out_proj.bias, expected,
                                   rtol=1e-5, atol=1e-6)


class Tied(nn.Module):
    """One Linear applied twice, and its weight reused (transposed use is another layer)."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(6, 6)
        self.middle = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.relu(self.shared(x))
        h = torch.relu(self.middle(h))
        h = torch.relu(F.linear(h, self.shared.weight))  # the same weight, later
        return self.head(h)


def test_shared_weight_is_one_layer_with_the_rows_of_every_use():
    torch.manual_seed(0)
    model = Tied().eval()
    x = torch.randn(4, 6)
    layers = find_layers(model, x[:1]).layers
    assert [(l.name, l.uses) for l in layers] == [("shared", 2), ("middle", 1), ("head", 1)]
    first = x
    second = torch.relu(model.middle(torch.relu(model.shared(x))))
    captured = capture_uses(model, layers[0], x)
    rows, _ = layer_rows(layers[0], captured, captured, 1.0, torch.Generator())
    torch.testing.assert_close(rows, torch.cat([first, second]).detach())
    data = TensorDataset(torch.randn(8, 6), torch.zeros(8, dtype=torch.long))
    settings = QuantConfig(bits=4, mlp_scalar=1.3, cnn_scalar=1.3)
    steps = {}
    for calibration in ("fresh", "fixed"):
        stream = CalibrationStream(data, 0, chunk_size=8)
        quantized, reports = quantize_network(model, stream, lambda i, n, l: settings,
                                              Calibration(8, 1.0, 0, mode=calibration, keep_rows=True),
                                              Hooks(log=lambda *a: None,
                                                    after_layer=lambda step, c=calibration: steps.setdefault(c, step)))
        assert [r.rows for r in reports][0] == 16  # 8 images, two uses
    # the first layer sees the float network in both modes, on the same 8 images (one draw)
    torch.testing.assert_close(steps["fresh"].analog_rows, steps["fixed"].analog_rows)


# ---------------------------------------------------------------- coverage
class Transformerish(nn.Module):
    """Parameters that stay float by design beside the matmul weights, and a transposed convolution."""

    def __init__(self, transposed_channels=2):
        super().__init__()
        self.embedding = nn.Embedding(10, 8)
        self.class_token = nn.Parameter(torch.zeros(1, 1, 8))
        self.position = nn.Parameter(torch.randn(1, 5, 8))
        self.norm = nn.LayerNorm(8)
        self.scale = nn.Parameter(torch.ones(8))
        self.table = nn.Parameter(torch.randn(9, 1))
        self.linear = nn.Linear(8, 8)
        self.up = nn.ConvTranspose1d(8, transposed_channels, 2, stride=2)

    def forward(self, tokens):
        x = self.embedding(tokens)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1) + self.position
        x = self.norm(x) * self.scale + self.table[torch.arange(5)].squeeze(-1)[:, None]
        x = self.linear(x)
        return self.up(x.transpose(1, 2))


def test_coverage_names_float_parameters_and_warns_on_unsupported_weights():
    model = Transformerish().eval()
    tokens = torch.randint(0, 10, (1, 4))
    discovery = find_layers(model, tokens)
    coverage = Coverage.of(discovery)
    assert [name for name, _, _ in coverage.quantized] == ["linear.weight"]
    assert {name for name, _, _ in coverage.by_design} == {
        "embedding.weight", "class_token", "position", "norm.weight", "norm.bias", "scale", "table", "linear.bias",
        "up.bias"}
    assert [name for name, _, _ in coverage.unsupported] == ["up.weight"]
    assert "transposed convolution" in coverage.unsupported[0][2]
    assert coverage.unsupported_fraction == pytest.approx(32 / (64 + 32))
    assert "up.weight" in coverage.warning()
    columns = coverage.columns()
    assert columns["Quantized Tensors"] == "1/11"
    total = sum(p.numel() for p in model.parameters())
    assert columns["Quantized Parameters"] == f"64/{total}"
    assert columns["Largest Float"].startswith("embedding.weight(80)")

    data = TensorDataset(torch.randint(0, 10, (4, 4)), torch.zeros(4, dtype=torch.long))
    settings = QuantConfig(bits=4, mlp_scalar=1.3, cnn_scalar=1.3)
    with pytest.raises(ValueError, match="strict_coverage: .*up.weight"):
        quantize_network(model, CalibrationStream(data, 0), lambda i, n, l: settings, Calibration(4, 1.0, 0),
                         Hooks(log=lambda *a: None), strict_coverage=True)
    with pytest.warns(UserWarning, match="cannot be quantized"):
        _, reports = quantize_network(model, CalibrationStream(data, 0), lambda i, n, l: settings,
                                      Calibration(4, 1.0, 0), Hooks(log=lambda *a: None))
    assert reports.coverage.columns()["Quantized Tensors"] == "1/11"
    small = Transformerish(transposed_channels=1).eval()  # 16 of 80 matmul parameters: still above 5 %
    assert Coverage.of(find_layers(small, tokens)).warning() is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quantize_network(nn.Sequential(nn.Linear(4, 3)),
                         CalibrationStream(
            TensorDataset(torch.randn(4, 4), torch.zeros(4)), 0),
                         lambda i, n, l: settings, Calibration(4, 1.0, 0), Hooks(log=lambda *a: None),
                         strict_coverage=True)


# ---------------------------------------------------------------- fixed mode on graphs fx cannot run
class Stateful(nn.Module):
    """Traces, but the traced graph bakes in a counter the eager forward keeps changing."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.linear(x) * self.calls


class ConstantTensor(nn.Module):
    """Traces with a tensor constant (fx stores it as '_tensor_constant0' on the trace, not on the model)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        return self.linear(x) + torch.tensor([1.0, 2.0, 3.0, 4.0])


def test_fixed_mode_refuses_a_graph_that_differs_from_the_model_and_runs_trace_constants():
    data = TensorDataset(torch.randn(4, 4), torch.zeros(4))
    settings = QuantConfig(bits=4, mlp_scalar=1.3, cnn_scalar=1.3)
    with pytest.raises(ValueError, match="use calibration='fresh'"):
        quantize_network(Stateful().eval(), CalibrationStream(data, 0), lambda i, n, l: settings,
                         Calibration(4, 1.0, 0, mode="fixed"), Hooks(log=lambda *a: None))
    model = ConstantTensor().eval()
    trace_graph(model, data.tensors[0][:1], find_layers(model, data.tensors[0][:1]).layers)
    _, reports = quantize_network(model, CalibrationStream(data, 0), lambda i, n, l: settings,
                                  Calibration(4, 1.0, 0, mode="fixed"), Hooks(log=lambda *a: None))
    assert len(reports) == 1


def test_public_api_quantizes_attention_and_reports_coverage():
    import gpfq
    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.attention(x, x, x, need_weights=False)[0].mean(1))

    model = Block().eval()
    result = gpfq.quantize(model, torch.randn(8, 5, 8), gpfq.QuantConfig(batch_size=4), log=lambda *a: None)
    assert [r.name for r in result.reports] == ["attention.in_proj_weight", "attention.out_proj", "head"]
    assert result.coverage.unsupported == [] and len(result.coverage.quantized) == 3
    tokens = torch.randint(0, 10, (4, 4))
    with pytest.raises(ValueError, match="strict_coverage"):
        gpfq.quantize(Transformerish().eval(), tokens, gpfq.QuantConfig(batch_size=4, strict_coverage=True),
                      log=lambda *a: None)
