"""Ad hoc variant: bias correction, layers left float, mixed precision."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gpfq.methods.alphabet import make_alphabet
from gpfq.io.models import load_saved_model
from helpers import (adhoc_bits, adhoc_logs, adhoc_point, bias_batches, bias_correctable_layers, bias_correction,
                     check_adhoc_model, check_options, layer_input, layer_order, logged_rows, point_context,
                     quantize_point, scored, script_logs, script_points)

ADHOC = "adhoc_quantization_scripts"
# the logs the scripts write (their file names, as docs/paper.md cites them)
BIAS_LOG, SKIP_LOG = "Quantization_Log_Bias_Correct.csv", "Quantization_Log_Skip.csv"
MIXED_LOG, RETRAIN_LOG = "Quantization_Log_Mixed_Precision.csv", "Quantization_Log_Retrain.csv"

# fashion_resnet's weight tensors, counted by hand from its architecture (C_out · C_in · kh · kw):
# a 3×3 stem 1→16, BasicBlocks 16→16, 16→32 (with a 1×1 downsample), 32→64 (with one), a 64→10 Linear.
WEIGHTS_PER_LAYER = {
    "stem.0": 16 * 1 * 9, "stages.0.conv1": 16 * 16 * 9, "stages.0.conv2": 16 * 16 * 9,
    "stages.1.conv1": 32 * 16 * 9, "stages.1.conv2": 32 * 32 * 9, "stages.1.downsample.0": 32 * 16,
    "stages.2.conv1": 64 * 32 * 9, "stages.2.conv2": 64 * 64 * 9, "stages.2.downsample.0": 64 * 32,
    "fc": 10 * 64,
}
TOTAL_WEIGHTS = 77072  # the sum of the above


def _hand_average_bits(bits_of: dict) -> float:
    return sum(WEIGHTS_PER_LAYER[n] * bits_of[n] for n in WEIGHTS_PER_LAYER) / TOTAL_WEIGHTS


def _full_output(layer, inputs, weight, bias):
    """The layer's full output with explicit parameters (the layer's own stride, padding, groups)."""
    if isinstance(layer, nn.Conv2d):
        return F.conv2d(inputs.double(), weight.double(), None if bias is None else bias.double(), layer.stride,
                        layer.padding, layer.dilation, layer.groups)
    return F.linear(inputs.double(), weight.double(), None if bias is None else bias.double())


def _channel_means(output, layer):
    dims = (0, 2, 3) if isinstance(layer, nn.Conv2d) else tuple(range(output.dim() - 1))
    return output.mean(dim=dims)


@torch.no_grad()
def _gap_means(analog_model, quantized_model, name, images):
    """Per-channel mean of analog output − quantized output, from explicit parameters, in float64."""
    analog_layer, quantized_layer = analog_model.get_submodule(name), quantized_model.get_submodule(name)
    analog = _full_output(analog_layer, layer_input(analog_model, name, images), analog_layer.weight,
                          analog_layer.bias)
    quantized = _full_output(quantized_layer, layer_input(quantized_model, name, images), quantized_layer.weight,
                             quantized_layer.bias)
    return _channel_means(analog - quantized, analog_layer), analog.pow(2).mean().sqrt()


def _adhoc_context(make_context, **options):
    defaults = dict(bias_correction=None, bias_batch_size=256, skip_layers=None, bits_map={}, saved_model=None)
    point = dict(defaults, **options)
    check_options(ADHOC, point)
    return make_context(ADHOC, **point)


def test_hand_count_matches_the_model(default_data):
    model = default_data[2]
    sizes = {n: m.weight.numel() for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert sizes == WEIGHTS_PER_LAYER and sum(sizes.values()) == TOTAL_WEIGHTS


@pytest.mark.slow
@pytest.mark.parametrize("name", ["stages.1.conv1", "fc"])
def test_bias_correction_zeroes_mean_output_gap(plain_default, name):
    """b' = b + mean(XWᵀ − X̃Qᵀ) over images and positions; afterwards the gap has mean 0 per channel."""
    analog_model = plain_default["context"].analog_model
    quantized_model = copy.deepcopy(plain_default["model"])
    images = plain_default["context"].calibration.tensors[0][:200]
    layer = quantized_model.get_submodule(name)
    had_bias = layer.bias is not None
    before, scale = _gap_means(analog_model, quantized_model, name, images)
    # the formula, without biases (equal in both models before the correction)
    with torch.no_grad():
        X = layer_input(analog_model, name, images)
        Xq = layer_input(quantized_model, name, images)
        formula = _channel_means(_full_output(layer, X, analog_model.get_submodule(name).weight, None)
                                 - _full_output(layer, Xq, layer.weight, None), layer)

    correction = bias_correction(analog_model, quantized_model, name, [images[:128], images[128:]])

    assert layer.bias is not None and had_bias == (name == "fc")  # the conv had no bias: it got one
    assert torch.allclose(correction, formula, rtol=1e-4, atol=1e-6 * float(scale))
    after, _ = _gap_means(analog_model, quantized_model, name, images)
    assert float(before.abs().max()) > 1e-3 * float(scale)  # there was a gap to remove
    assert float(after.abs().max()) < 1e-6 * float(scale)


@pytest.mark.slow
def test_first_layer_left_float_every_layer_corrected_mixed_bits(make_context, tmp_path):
    """skip_layers='first' + bias_correction='all' + bits_map: one small fresh run, three properties."""
    context = _adhoc_context(make_context, batch_size=32, bias_correction="all", bias_batch_size=128,
                             skip_layers="first", bits_map={"stages.2.*": 4})
    float_model = context.analog_model
    model, reports, extra = quantize_point(ADHOC, context)

    # the first layer is the float one, bit for bit; the second is quantized
    assert torch.equal(model.stem[0].weight, float_model.stem[0].weight)
    assert not torch.equal(model.stages[0].conv1.weight, float_model.stages[0].conv1.weight)
    assert [r.name for r in reports] == list(WEIGHTS_PER_LAYER)[1:]
    assert {r.name: r.bits for r in reports} == {n: 4 if n.startswith("stages.2.") else 3
                                                 for n in list(WEIGHTS_PER_LAYER)[1:]}
    bits_of = {n: 32 if n == "stem.0" else 4 if n.startswith("stages.2.") else 3 for n in WEIGHTS_PER_LAYER}
    assert extra["Average Bits"] == round(_hand_average_bits(bits_of), 4) == round(292736 / 77072, 4)

    # every quantized layer's output gap has mean 0 on its own bias-correction batch
    stream = bias_batches(context)
    for report in reports:
        images = torch.cat(stream.draw(128))
        gap, scale = _gap_means(float_model, model, report.name, images)
        assert float(gap.abs().max()) < 1e-5 * float(scale), report.name

    # the saved state (with the biases the convolutions gained) loads back
    path = tmp_path / "all.pt"
    torch.save(model.state_dict(), path)
    loaded = load_saved_model(path, float_model)
    assert loaded.stages[2].conv2.bias is not None
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


@pytest.mark.slow
def test_last_layer_left_float(make_context):
    context = _adhoc_context(make_context, batch_size=32, skip_layers="last")
    float_model = context.analog_model
    model, reports, extra = quantize_point(ADHOC, context)
    assert torch.equal(model.fc.weight, float_model.fc.weight) and torch.equal(model.fc.bias, float_model.fc.bias)
    assert not torch.equal(model.stem[0].weight, float_model.stem[0].weight)
    assert "fc" not in [r.name for r in reports]
    assert extra["Average Bits"] == round((32 * 640 + 3 * (TOTAL_WEIGHTS - 640)) / TOTAL_WEIGHTS, 4)


@pytest.mark.slow
def test_variant2_from_saved_model_keeps_accuracy(plain_default, plain_point):
    """Paper variant 2 on the saved plain model: last layer back to float, its bias corrected with X̃."""
    header = dict(plain_default["context"].run.header, bits=4, batch_size=64, saved_model=str(plain_default["path"]),
                  bias_correction="last_float", bias_batch_size=1024, skip_layers=None, bits_map={})
    point = adhoc_point(header)
    assert point["bits"] == 3 and point["batch_size"] == plain_point["batch_size"] != 64  # from the sidecar
    check_options(ADHOC, point)
    plain = plain_default["context"]  # the plain point's data and float model, with the resolved point's settings
    context = point_context(point, (plain.calibration, plain.evaluation, plain.analog_model), ADHOC)
    model, reports, extra = quantize_point(ADHOC, context)

    float_model, plain = context.analog_model, plain_default["model"]
    assert torch.equal(model.fc.weight, float_model.fc.weight)
    assert not torch.equal(model.fc.bias, float_model.fc.bias)
    for name in list(WEIGHTS_PER_LAYER)[:-1]:
        assert torch.equal(model.get_submodule(name).weight, plain.get_submodule(name).weight)
    assert [r.name for r in reports] == list(WEIGHTS_PER_LAYER)[:-1]
    assert extra["Source Model"] and extra["Bias Correction"] == "last_float"
    top1, _ = scored(model, context.loader())
    print(f"variant 2 top-1 {top1:.4f}, plain {plain_default['top1']:.4f}")
    assert top1 >= plain_default["top1"] - 0.003


@pytest.mark.slow
def test_mixed_precision_8_3_8_not_below_uniform_3_bits(make_context, plain_default):
    context = _adhoc_context(make_context, bits_map={0: 8, -1: 8})
    model, reports, extra = quantize_point(ADHOC, context)
    bits_of = {n: 8 if n in ("stem.0", "fc") else 3 for n in WEIGHTS_PER_LAYER}
    assert {r.name: r.bits for r in reports} == bits_of
    assert extra["Average Bits"] == round(_hand_average_bits(bits_of), 4) == round(235136 / 77072, 4)
    stem = next(r for r in reports if r.name == "stem.0")
    alphabet = make_alphabet("gpfq2022", 8, 1.3, stem.radius, True).float()
    assert stem.levels == 2 ** 8 + 1 and torch.isin(model.stem[0].weight, alphabet).all()
    top1, _ = scored(model, context.loader())
    print(f"8/3/8 top-1 {top1:.4f}, uniform 3 bits {plain_default['top1']:.4f}")
    assert top1 >= plain_default["top1"]


def test_bad_adhoc_hyperparameters_fail_early(tmp_path):
    base = dict(bias_correction="last", bias_batch_size=64, skip_layers=None, bits_map={}, saved_model=None)
    for bad, message in [(dict(bias_correction="first"), "bias_correction"), (dict(bias_batch_size=0), "bias_batch"),
                         (dict(skip_layers="middle"), "skip_layers"), (dict(bits_map={"fc": 0}), "bits_map"),
                         (dict(bits_map=[8]), "bits_map"), (dict(bias_correction=None), "no ad hoc option")]:
        with pytest.raises(ValueError, match=message):
            check_options(ADHOC, dict(base, **bad))
    with pytest.raises(ValueError, match="match no layer"):
        adhoc_bits(list(WEIGHTS_PER_LAYER), {"stage.*": 8}, 3)
    assert adhoc_bits(list(WEIGHTS_PER_LAYER), {"stages.*": 4, -1: 8, "stages.2.conv2": 2}, 3) == {
        n: 8 if n == "fc" else 2 if n == "stages.2.conv2" else 4 if n.startswith("stages") else 3
        for n in WEIGHTS_PER_LAYER}
    with pytest.raises(ValueError, match="not found"):
        adhoc_point(dict(base, saved_model=str(tmp_path / "missing.pt")))
    (tmp_path / "lonely.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="no JSON sidecar"):
        adhoc_point(dict(base, saved_model=str(tmp_path / "lonely.pt")))
    with pytest.raises(ValueError, match="only bias_correction"):
        adhoc_point(dict(base, saved_model="x.pt", skip_layers="first"))


def test_grid_logs_and_routing(tmp_path):
    header = dict(bits=[3], bias_correction="last", skip_layers=None, bits_map={})
    points = script_points(ADHOC, "--bias_correction", "last", "all", "--bits_map", "{0: 8, 'fc': 8}",
                           "--skip_layers", "None", "first", header=header)
    assert len(points) == 4 and points[0]["bits_map"] == {0: 8, "fc": 8}
    assert adhoc_logs({key: points[-1][key] for key in ("bias_correction", "skip_layers", "bits_map")}) == [
        BIAS_LOG, SKIP_LOG, MIXED_LOG]
    assert adhoc_logs(dict(bias_correction=None, bias_batch_size=None, skip_layers="last", bits_map={})) == [SKIP_LOG]

    import importlib.util
    from gpfq.paths import REPO_ROOT
    spec = importlib.util.spec_from_file_location("init_logs", REPO_ROOT / "logs" / "init_logs.py")
    init_logs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(init_logs)
    init_logs.main(tmp_path)
    for name in (BIAS_LOG, SKIP_LOG, MIXED_LOG, RETRAIN_LOG):
        assert (tmp_path / name).read_text().splitlines()[0].split(",") == script_logs()[name]
        assert logged_rows(tmp_path / name) == []
    bias = script_logs()[BIAS_LOG]
    assert bias[bias.index("Quantization Batch Size") + 1] == "Bias Correction Batch Size"
    # the three ad hoc logs hold the same columns, so one row fits each of them
    ad_hoc_columns = [set(script_logs()[name]) for name in (BIAS_LOG, SKIP_LOG, MIXED_LOG)]
    assert ad_hoc_columns[0] == ad_hoc_columns[1] == ad_hoc_columns[2]


# ---------------------------------------------------------------- layers that are not Linear/conv modules
class TinyAttention(nn.Module):
    """28×28 images → 16 patch tokens (Conv2d), a Conv1d over the token sequence, self-attention, a Linear head.
    With `head=False` the attention's out_proj (a Linear that is never called) is the last layer."""

    def __init__(self, head: bool = True):
        super().__init__()
        width = 16 if head else 10
        self.patch = nn.Conv2d(1, width, 7, stride=7)
        self.mix = nn.Conv1d(width, width, 3, padding=1)
        self.attention = nn.MultiheadAttention(width, 2, batch_first=True)
        self.head = nn.Linear(width, 10) if head else None

    def forward(self, x):
        tokens = self.mix(self.patch(x).flatten(2)).transpose(1, 2)  # (n, 16 tokens, width)
        tokens = tokens + self.attention(tokens, tokens, tokens, need_weights=False)[0]
        pooled = tokens.mean(1)
        return self.head(pooled) if self.head is not None else pooled


def test_correctable_layers_are_the_called_linear_and_conv_modules():
    torch.manual_seed(0)
    model = TinyAttention().eval()
    example = torch.randn(1, 1, 28, 28)
    names = layer_order(model, example)
    assert names == ["patch", "mix", "attention.in_proj_weight", "attention.out_proj", "head"]
    assert bias_correctable_layers(model, names, example) == {"patch", "mix", "head"}


def test_bias_correction_of_a_conv1d_zeroes_its_mean_gap_per_channel():
    """Conv1d outputs are (n, C, L): the gap is averaged over images and positions per channel C (L ≠ C here)."""
    torch.manual_seed(0)
    analog = nn.Sequential(nn.Conv1d(3, 4, 3), nn.ReLU(), nn.Conv1d(4, 5, 3, bias=False)).eval()
    quantized = copy.deepcopy(analog)
    with torch.no_grad():
        for layer in (quantized[0], quantized[2]):
            layer.weight.copy_(layer.weight.round())
    images = torch.randn(32, 3, 11)
    bias_correction(analog, quantized, "2", [images], log=lambda message: None)
    with torch.no_grad():
        gap = (analog(images) - quantized(images)).double().mean(dim=(0, 2))  # (5,): by hand
    assert quantized[2].bias.shape == (5,)
    assert gap.abs().max() < 1e-6
    from gpfq.io.state_dicts import load_state  # the corrected model's saved state fits the architecture again
    reloaded = load_state(copy.deepcopy(analog), quantized.state_dict())
    assert torch.equal(reloaded[2].bias, quantized[2].bias) and torch.equal(reloaded[0].bias, quantized[0].bias)


def test_bias_correction_all_leaves_attention_biases_and_corrects_the_rest(make_context):
    torch.manual_seed(0)
    model = TinyAttention().eval()
    calibration = torch.utils.data.TensorDataset(torch.randn(256, 1, 28, 28), torch.zeros(256, dtype=torch.long))
    messages = []
    context = make_context(ADHOC, bias_correction="all", bias_batch_size=64, batch_size=64, skip_layers=None,
                           bits_map={}, saved_model=None, bits=4)
    context = copy.copy(context)
    context.calibration, context.analog_model, context.log = calibration, model, messages.append
    corrected, reports, _ = quantize_point(ADHOC, context)
    assert [r.name for r in reports] == ["patch", "mix", "attention.in_proj_weight", "attention.out_proj", "head"]
    assert any("2 of 5 layers are not Linear or convolution modules" in m and "attention.in_proj_weight, "
               "attention.out_proj" in m for m in messages)
    assert torch.equal(corrected.attention.in_proj_bias, model.attention.in_proj_bias)
    assert torch.equal(corrected.attention.out_proj.bias, model.attention.out_proj.bias)
    for name in ("patch", "mix", "head"):
        assert not torch.equal(corrected.get_submodule(name).bias, model.get_submodule(name).bias), name


def test_bias_correction_of_a_last_layer_that_is_no_module_is_refused_before_work():
    torch.manual_seed(0)
    model = TinyAttention(head=False).eval()
    example = torch.randn(1, 1, 28, 28)
    def options(mode):
        return dict(bias_correction=mode, bias_batch_size=64, bits_map={})
    for mode in ("last", "last_float"):
        with pytest.raises(ValueError, match=f"bias_correction '{mode}' corrects the last layer's bias, and the last "
                                             f"layer, attention.out_proj, is not a Linear or convolution module"):
            check_adhoc_model(options(mode), model, example, bits=4)
    check_adhoc_model(options("all"), model, example, bits=4)  # 'all' corrects the layers it can
