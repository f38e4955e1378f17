"""Reporting the layer loop: each quantized layer's `LayerReport` (error, bits, zeros, warnings) and log line,
the run's coverage check, and the reports as JSON-ready records."""
import math
import time
import warnings
from dataclasses import asdict, dataclass, field, replace

import torch
from tqdm import tqdm

from gpfq.errors import bad_hyperparameter
from gpfq.methods.codes import code_entropy, encode, layer_codebook, stored_bits
from gpfq.methods.gpfq.reference import relative_error
from gpfq.pipeline.coverage import Coverage


@dataclass
class LayerReport:
    index: int
    name: str
    kind: str
    weight_shape: tuple
    rows: int
    bits: int
    levels: int
    radius: float  # the layer's radius; with per-channel alphabets, the mean of the channels' radii
    relative_error: float  # NaN when ‖XWᵀ‖ = 0 on the calibration rows (undefined)
    seconds: float
    zero_weights: int = 0  # quantized weights equal to 0 (sparsity)
    form: str = ""  # how the layer was computed: "residual", "gram", "columns" or the method's name
    streamed: bool = False  # rows summed into Gram statistics chunk by chunk, never held
    rule_seconds: float = 0.0  # of `seconds`, the time in the layer rule alone (no forward passes, no rows)
    stored_bits: int = 0  # ⌈log2 levels⌉: bits per weight of its packed integer code
    code_entropy: float = 0.0  # empirical entropy of the codes, bits per weight
    parameter: str = ""  # the weight's parameter name ('layer1.0.conv1.weight', '…in_proj_weight')
    input_major: bool = False  # the parameter is stored (N0, N1) and multiplied as x @ W (an output per column)
    # the layer's alphabet, (L,) or (G, N1, L) per channel: the codebook of the saved codes (not in the JSON record)
    alphabet: torch.Tensor = field(default=None, repr=False, compare=False)
    warnings: list = field(default_factory=list)  # signs of a degenerate result (`layer_warnings`)


# A layer is flagged when most of its weights quantize to 0 or its relative error is this large: with
# either, the network's output is mostly lost, whatever the other layers do.
ZERO_WARNING = 0.99
ERROR_WARNING = 0.5


def layer_warnings(rows: int, n_inputs: int, zeros: int, size: int, error: float, input_kind: str = None) -> list:
    """Warnings for a quantized layer: fewer calibration rows than weights per neuron (GPFQ's error bound
    needs m large compared with N0; with m < N0 the layer fits its few rows and nothing else), a float input
    that is zero or the same on every row (`input_degeneracy`), ≥ 99 % zeros, relative error ≥ 0.5."""
    warnings = []
    if input_kind == "zero":
        warnings.append(f"its float input is zero on all {rows} calibration rows (all-zero calibration data, or a "
                        f"layer before it whose output is zero?): the data do not constrain its weights")
    elif input_kind == "constant":
        warnings.append(f"its float input is the same on all {rows} calibration rows (constant calibration data?): "
                        f"the data constrain only one direction of each neuron's weights")
    if rows < n_inputs:
        warnings.append(f"{rows} calibration rows < {n_inputs} weights per neuron (GPFQ needs m ≫ N0: raise "
                        f"batch_size or retain_rate)")
    if size and zeros / size >= ZERO_WARNING:
        # with degenerate input the cause is the data, not the alphabet
        guess = "" if input_kind else " (alphabet too coarse for them?)"
        warnings.append(f"{zeros / size:.1%} of the weights quantized to 0{guess}")
    if error >= ERROR_WARNING:
        warnings.append(f"relative error {error:.4f} ≥ {ERROR_WARNING}")
    return warnings


# Rows whose total variance is below this fraction of their second moment count as all the same row
# (float sums of identical rows leave a residue of about 1e-12 of it).
CONSTANT_INPUT_TOLERANCE = 1e-9


def input_degeneracy(rows: int, column_sums: torch.Tensor, square_sum: float) -> str:
    """'zero' when every calibration row of X is 0, 'constant' when all rows are equal, else None.
    column_sums: Σ_i x_i (any shape); square_sum: ‖X‖²_F."""
    square_sum = float(square_sum)
    if square_sum == 0.0:
        return "zero"
    variance = square_sum - float(column_sums.double().pow(2).sum()) / rows  # Σ_i ‖x_i − mean‖²
    if rows > 1 and variance <= CONSTANT_INPUT_TOLERANCE * square_sum:
        return "constant"
    return None


def format_error(error: float) -> str:
    """A relative error for the log; NaN (‖XWᵀ‖ = 0) is undefined, not 0."""
    if math.isnan(error):
        return "undefined (the layer's float output is zero on the calibration data)"
    return f"{error:.4f}"


@dataclass
class LayerResult:
    """A layer as its rule left it: weight and Q (G, N1, N0), the rows (G, m, N0) the rule saw (None when
    streamed), the alphabet ((L,) or (G, N1, L)) with its radius, and the seconds in the rule alone."""
    weight: torch.Tensor
    quantized_weight: torch.Tensor
    analog: torch.Tensor
    quantized: torch.Tensor
    alphabet: torch.Tensor
    radius: float
    rule_seconds: float


def layer_measures(rows, result: LayerResult) -> tuple:
    """(relative error, row count, row width G·N0, input degeneracy) of a layer: from its Gram sums when it has
    them (`calibrator.LayerRows`), else from its rows."""
    weight, quantized_weight = result.weight, result.quantized_weight
    if rows.statistics is not None:
        statistics = rows.statistics
        error = statistics.relative_error(weight, quantized_weight)
        n_rows, width = statistics.rows, weight.shape[0] * weight.shape[2]
        return error, n_rows, width, input_degeneracy(n_rows, statistics.analog_sum, statistics.analog_square_sum)
    error = relative_error(weight, quantized_weight, result.analog, result.quantized)
    n_rows, width = rows.analog.shape
    rows64 = rows.analog.double()
    return error, n_rows, width, input_degeneracy(n_rows, rows64.sum(dim=0), rows64.pow(2).sum())


def report_layer(index: int, layer, config, rows, result: LayerResult, quantized_model, started: float):
    """(LayerReport, row width) of a quantized layer whose Q is already written into `quantized_model`.
    started: its time.time() at the start of the layer."""
    error, n_rows, width, input_kind = layer_measures(rows, result)
    quantized_weight, alphabet = result.quantized_weight, result.alphabet
    zeros = int((quantized_weight == 0).sum())
    stored = quantized_model.get_parameter(layer.parameter)
    stored = stored.t().contiguous() if layer.input_major else stored  # (N1, …): a row per output
    codes = encode(stored, layer_codebook(alphabet, stored), f"layer {layer.name}")
    report = LayerReport(index, layer.name, layer.kind, tuple(layer.weight.shape), n_rows, config.bits,
                         alphabet.shape[-1], result.radius, error, time.time() - started, zero_weights=zeros,
                         form=rows.form, streamed=rows.statistics is not None and rows.analog is None,
                         rule_seconds=result.rule_seconds, stored_bits=stored_bits(alphabet.shape[-1]),
                         code_entropy=code_entropy(codes, alphabet.shape[-1]), alphabet=alphabet.detach().cpu(),
                         parameter=layer.parameter, input_major=layer.input_major,
                         warnings=layer_warnings(n_rows, result.weight.shape[2], zeros, quantized_weight.numel(),
                                                 error, input_kind))
    return report, width


def log_line(report: LayerReport, config, n_layers: int, width: int) -> str:
    """The console line of a quantized layer: shapes, method and form, bits, error, zeros, time, warnings."""
    size = math.prod(report.weight_shape)
    return (f"[{report.index + 1}/{n_layers}] {report.name} {report.kind} W{report.weight_shape} X({report.rows}, "
            f"{width}) {config.method} ({report.form}{', streamed' if report.streamed else ''}) {config.bits} bits, "
            f"{report.levels} levels{' per channel' if config.alphabet_granularity == 'channel' else ''} "
            f"({report.stored_bits} stored bits, entropy {report.code_entropy:.2f}): "
            f"rel. error {format_error(report.relative_error)}, {report.zero_weights / size:.1%} zeros, "
            f"{report.seconds:.1f}s" + "".join(f"; WARNING: {warning}" for warning in report.warnings))


class LayerReports(list):
    """[LayerReport] of the quantized layers, with the run's `coverage` (coverage.Coverage)."""
    coverage: Coverage = None
    activations = None  # gpfq.pipeline.activations.ActivationQuantizers, set by gpfq.quantize with act_bits


def check_coverage(coverage: Coverage, strict: bool, log=tqdm.write) -> None:
    """Warn (or, strict, refuse with a ValueError) when more than 5 % of the matmul parameters cannot be quantized."""
    warning = coverage.warning()
    if warning is None:
        return
    if strict:
        raise bad_hyperparameter(f"strict_coverage: {warning}")
    warnings.warn(warning, stacklevel=3)
    log(f"warning: {warning}")


def check_layer_indices(key: str, indices, names: list) -> None:
    """ValueError if a layer index (execution order, negative from the end) of `key` matches no layer."""
    bad = [i for i in indices if not -len(names) <= i < len(names)]
    if bad:
        raise bad_hyperparameter(f"{key} {bad} match no layer; the model has {len(names)} "
                                 f"(0 … {len(names) - 1}): {', '.join(f'{i}: {n}' for i, n in enumerate(names))}")


def reports_as_dicts(reports) -> list:
    """The reports as JSON-ready dicts (without the alphabet tensors); an undefined (NaN) relative error is None
    (JSON null: NaN is not JSON)."""
    dicts = [{k: v for k, v in asdict(replace(r, alphabet=None)).items() if k != "alphabet"} for r in reports]
    for record in dicts:
        if isinstance(record["relative_error"], float) and math.isnan(record["relative_error"]):
            record["relative_error"] = None
    return dicts


def zero_fraction(reports) -> float:
    """Fraction of the quantized layers' weights that are 0."""
    total = sum(math.prod(r.weight_shape) for r in reports)
    return sum(r.zero_weights for r in reports) / total if total else 0.0
