"""QuantConfig: every quantization hyperparameter, in one typed place.

A field's name is the scripts' header key, its default the scripts' default, and its metadata says
where it goes in the result logs (`column`), whether a list of values in a header expands into a
grid (`grid`), and whether `gpfq.quantize(layers=…)` may change it for single layers (`per_layer`).
Adding an option: add a field here (with its check in `__post_init__`), then use it where it acts.
"""
import dataclasses
import fnmatch
from dataclasses import dataclass, field

from gpfq.pipeline.activations import ACT_CALIBRATIONS, ACT_GRANULARITIES
from gpfq.methods.alphabet import ALPHABET_KINDS, GRANULARITIES, MAX_BITS
from gpfq.methods.gpfq.column_order import COLUMN_ORDERS
from gpfq.methods.gpfq.engine import ENGINES
from gpfq.errors import bad_hyperparameter
from gpfq.methods import METHOD_NAMES, METHODS
from gpfq.pipeline.calibrator import CALIBRATIONS
from gpfq.methods.qronos import DEFAULT_DAMPING as QRONOS_DAMPING
from gpfq.methods.gpfq.reference import FIRST_COLUMN_RULES
from gpfq.methods.rounding import THRESHOLDINGS

PATCH_STRIDES = ("kernel", "layer")
METHOD_OPTIONS = "Method Options"  # one log column describing the options of the point's method


def option(default, column, grid=True, per_layer=True, choices=None):
    """A field: its log column, whether it is a grid axis and may differ per layer, its allowed values."""
    return field(default=default, metadata={"column": column, "grid": grid, "per_layer": per_layer,
                                            "choices": choices})


def _fail(message):
    raise bad_hyperparameter(message)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class QuantConfig:
    """How a network is quantized (the paper's GPFQ at 4 bits by default).

    Conv2d layers take the cnn_* scalar and percentile, Linear layers the mlp_* ones: each layer's
    alphabet radius is scalar · (mean over neurons of the `percentile` quantile of |w|).
    """
    method: str = option("gpfq", "Method", choices=METHOD_NAMES)  # gpfq, msq, gptq, spfq, sparse_gpfq, qronos
    bits: int = option(4, "Bits")
    batch_size: int = option(512, "Quantization Batch Size", per_layer=False)  # m: calibration images per layer
    mlp_scalar: float = option(1.3, "MLP_Alphabet_Scalar")
    cnn_scalar: float = option(1.3, "CNN_Alphabet_Scalar")
    mlp_percentile: float = option(1.0, "MLP_Percentile")
    cnn_percentile: float = option(1.0, "CNN_Percentile")
    alphabet: str = option("gpfq2022", "Alphabet", choices=ALPHABET_KINDS)  # gpfq2022, midtread, strict
    include_0: bool = option(True, "Include 0")
    retain_rate: float = option(0.25, "Retain_rate", per_layer=False)  # conv layers: fraction of patches kept
    seed: int = option(0, "Seed", per_layer=False)
    # one alphabet radius per layer (the paper) or per output channel
    alphabet_granularity: str = option("layer", "Alphabet Granularity", choices=GRANULARITIES)
    fold_batchnorm: bool = option(False, "Fold BatchNorm", per_layer=False)
    sparsity_threshold: float = option(0.0, METHOD_OPTIONS)  # sparse_gpfq: λ / the largest level
    thresholding: str = option("soft", METHOD_OPTIONS, choices=THRESHOLDINGS)  # sparse_gpfq: soft (L1), hard (L0)
    gptq_block_size: int = option(128, METHOD_OPTIONS)
    gptq_damping: float = option(0.01, METHOD_OPTIONS)
    gptq_act_order: bool = option(False, METHOD_OPTIONS)
    engine: str = option("auto", "Engine", choices=ENGINES)  # GPFQ: auto, residual, gram, columns
    # fresh (the paper: m new images per layer) or fixed (one set of m images for every layer)
    calibration: str = option("fresh", "Calibration", per_layer=False, choices=CALIBRATIONS)
    # gpfq: "paper", or "code2022" (the 2022 code: Q_A(w_t) when |<X̃_t, u>| < 1e-10)
    gpfq_first_column: str = option("paper", METHOD_OPTIONS, choices=FIRST_COLUMN_RULES)
    # gpfq, spfq, sparse_gpfq, qronos: "natural" or "act_order" (decreasing ||X̃_t||²)
    column_order: str = option("natural", METHOD_OPTIONS, choices=COLUMN_ORDERS)
    qronos_damping: float = option(QRONOS_DAMPING, METHOD_OPTIONS)  # qronos: ridge λ = damping · λ_max(X̃ᵀX̃)
    patch_stride: str = option("kernel", "Patch Stride", grid=False, per_layer=False)  # kernel, layer
    ignore_layers: tuple = option((), "Ignore Layers", grid=False, per_layer=False)  # indices left float
    # refuse a model of which more than 5 % of the matmul parameters cannot be quantized (docs/capture.md)
    strict_coverage: bool = option(False, "Strict Coverage", grid=False, per_layer=False)
    # quantized activations (gpfq.pipeline.activations): None = float (the paper), or 2 … 8 bits on each quantized layer's
    # input, one calibrated scale and zero point per tensor ('minmax' over the calibration images)
    act_bits: int = option(None, "Act Bits", per_layer=False)
    act_granularity: str = option("tensor", "Act Granularity", grid=False, per_layer=False, choices=ACT_GRANULARITIES)
    act_calibration: str = option("minmax", "Act Calibration", grid=False, per_layer=False, choices=ACT_CALIBRATIONS)

    def __post_init__(self):
        if isinstance(self.ignore_layers, list):
            object.__setattr__(self, "ignore_layers", tuple(self.ignore_layers))
        if not _is_int(self.bits) or self.bits < 1:
            _fail(f"bits must be a positive integer, got {self.bits!r}")
        if self.bits > MAX_BITS:
            _fail(f"bits {self.bits} is more than the alphabets support: at most {MAX_BITS} bits "
                  f"({2 ** MAX_BITS + 1} levels)")
        for key in ("mlp_scalar", "cnn_scalar"):
            value = getattr(self, key)
            if not _is_number(value) or not value > 0:
                _fail(f"{key} must be a number > 0, got {value!r}")
        for key in ("mlp_percentile", "cnn_percentile", "retain_rate"):
            value = getattr(self, key)
            if not _is_number(value) or not 0 < value <= 1:
                _fail(f"{key} must be in (0, 1], got {value!r}")
        if not _is_int(self.batch_size) or self.batch_size < 1:
            _fail(f"batch_size (m) must be an integer ≥ 1, got {self.batch_size!r}")
        if not _is_int(self.seed):
            _fail(f"seed must be an integer, got {self.seed!r}")
        for item in dataclasses.fields(self):  # the choices and the switches
            value, choices = getattr(self, item.name), item.metadata["choices"]
            if choices is not None and value not in choices:
                _fail(f"{item.name} must be one of {choices}, got {value!r}")
            if item.type is bool and not isinstance(value, bool):
                _fail(f"{item.name} must be True or False, got {value!r}")
        if not _is_number(self.sparsity_threshold) or not self.sparsity_threshold >= 0:
            _fail(f"sparsity_threshold (λ, relative to the alphabet's largest level) must be a number ≥ 0, "
                  f"got {self.sparsity_threshold!r}")
        if self.method == "sparse_gpfq" and self.alphabet == "gpfq2022" and not self.include_0:
            _fail("sparse_gpfq needs the level 0 in the alphabet: set include_0 = True (or another alphabet)")
        if not _is_int(self.gptq_block_size) or self.gptq_block_size < 1:
            _fail(f"gptq_block_size must be an integer ≥ 1, got {self.gptq_block_size!r}")
        for key in ("gptq_damping", "qronos_damping"):
            value = getattr(self, key)
            if not _is_number(value) or not value >= 0:
                _fail(f"{key} must be a number ≥ 0, got {value!r}")
        if self.patch_stride not in PATCH_STRIDES:
            _fail(f"patch_stride must be 'kernel' or 'layer', got {self.patch_stride!r}")
        if self.act_bits is not None and (not _is_int(self.act_bits) or not 2 <= self.act_bits <= 8):
            _fail(f"act_bits must be None (float activations) or an integer in 2 … 8, got {self.act_bits!r}")
        if self.act_bits is not None and self.calibration == "fixed":
            _fail("act_bits with calibration 'fixed' is not supported (its cached forward pass does not run the "
                  "activation quantizers): use calibration 'fresh'")
        if self.act_bits == 8:
            _check_int8_weights(self.alphabet, self.bits)
        if not isinstance(self.ignore_layers, tuple) or not all(_is_int(i) for i in self.ignore_layers):
            _fail(f"ignore_layers must be a list of layer indices, got {list_or_value(self.ignore_layers)!r}")

    def replace(self, **changes) -> "QuantConfig":
        """A copy with `changes`, checked; it keeps the `with_layers` choices."""
        changed = dataclasses.replace(self, **changes)
        object.__setattr__(changed, "_layers", self._layers)
        return changed

    # per-layer choices that `with_layers` attaches: not a hyperparameter of the header or the logs, but part of
    # what the config quantizes, so replace() keeps them and == compares them
    _layers = None

    def __eq__(self, other) -> bool:  # (the dataclass still hashes the fields: equal configs hash alike)
        if not isinstance(other, QuantConfig):
            return NotImplemented
        fields = [item.name for item in dataclasses.fields(self)]
        return ([getattr(self, f) for f in fields], self._layers) == ([getattr(other, f) for f in fields],
                                                                     other._layers)

    def with_layers(self, layers) -> "QuantConfig":
        """A copy whose `for_layer` also applies `layers`: {index or fnmatch name pattern: None (float) | bits |
        {field: value}} (the last matching entry wins), or a list of indices or patterns (only those quantized)."""
        chosen = dataclasses.replace(self)
        object.__setattr__(chosen, "_layers", layers)
        return chosen

    def for_layer(self, index: int, name: str, n_layers: int) -> "QuantConfig":
        """The config layer `index` of `n_layers` (execution order, named `name`) is quantized with, or None to
        leave it float: `ignore_layers`, then the `with_layers` choices. Its seed is the layer's own
        (`layer_seed`), which seeds SPFQ's stochastic rounding."""
        if index in {i % n_layers for i in self.ignore_layers}:
            return None
        chosen = self
        if isinstance(self._layers, (list, tuple, set)):
            if not any(_layer_matches(key, index, name, n_layers) for key in self._layers):
                return None
        else:
            for key, overrides in (self._layers or {}).items():
                if _layer_matches(key, index, name, n_layers):
                    chosen = None if overrides is None else dataclasses.replace(
                        self, **(overrides if isinstance(overrides, dict) else {"bits": overrides}))
        # dataclasses.replace: a layer's own config carries no choices of its own
        return None if chosen is None else dataclasses.replace(chosen, seed=layer_seed(self.seed, index))

    def method_description(self) -> str:
        """The options that matter for the method, for the log's Method Options column (`Method.describe`)."""
        return METHODS[self.method].describe(self)

    def log_columns(self) -> dict:
        """{log column: value} of every field (the method options share one column)."""
        columns = {}
        for item in dataclasses.fields(self):
            column = item.metadata["column"]
            value = getattr(self, item.name)
            if column == METHOD_OPTIONS:
                value = self.method_description()
            elif item.name == "ignore_layers":
                value = " ".join(str(i) for i in value)
            elif item.name.startswith("act_") and item.name != "act_bits" and self.act_bits is None:
                value = ""  # float activations: their grid options say nothing
            columns[column] = value
        return columns


def _check_int8_weights(alphabet: str, bits: int):
    """act_bits 8 means an int8 (QDQ) deployment: refuse weights whose levels are not int8 integers."""
    if alphabet == "gpfq2022" and bits >= 8:
        _fail(f"act_bits 8 (an int8 QDQ deployment) with {bits}-bit gpfq2022 weights cannot be exported: their "
              f"levels are the odd integers up to ±{2 ** bits - 1} on the int8 grid (int8 holds ±127); use "
              f"alphabet 'strict', or at most 7 bits")
    if bits > 8:
        _fail(f"act_bits 8 (an int8 QDQ deployment) with {bits}-bit weights cannot be exported: int8 weights "
              f"hold at most 8 bits; use alphabet 'strict' with at most 8 bits")


def _layer_matches(key, index: int, name: str, n_layers: int) -> bool:
    """Whether a layer choice's key names layer `index`: an index (negative from the end) or an fnmatch pattern."""
    if isinstance(key, int) and not isinstance(key, bool):
        return -n_layers <= key < n_layers and key % n_layers == index
    return fnmatch.fnmatchcase(name, key)


def list_or_value(value):
    return list(value) if isinstance(value, tuple) else value


FIELDS = tuple(item.name for item in dataclasses.fields(QuantConfig))
GRID_FIELDS = tuple(item.name for item in dataclasses.fields(QuantConfig) if item.metadata["grid"])
PER_LAYER_FIELDS = tuple(item.name for item in dataclasses.fields(QuantConfig) if item.metadata["per_layer"])
CONFIG_COLUMNS = tuple(dict.fromkeys(item.metadata["column"] for item in dataclasses.fields(QuantConfig)))


def layer_seed(seed: int, index: int) -> int:
    """Seed of layer `index`'s stochastic rounding: distinct per layer, fixed by the config's seed."""
    return seed * 1_000_003 + index
