"""The scripts' headers: command-line overrides, the grid of points, and the checks of a point.

A script holds a header dict of hyperparameters. `parse_overrides` applies `--name value …`,
`expand_grid` turns list values of the grid keys into one point per combination, and `parse_point`
checks a point before anything loads and parses it, once, into a typed `Point` (QuantConfig,
RunConfig): nothing below reads the dict. The quantization hyperparameters are `QuantConfig`'s fields;
the other keys (RUN_KEYS) say what runs where (`RunConfig`); a variant adds its own (`experiment.Variant`).
"""
import argparse
import ast
import dataclasses
import difflib
import importlib.util
import itertools
import math

import torch

from gpfq.config import FIELDS, GRID_FIELDS, QuantConfig
from gpfq.io.data import DATASETS, dataset_label
from gpfq.errors import bad_hyperparameter
from gpfq.io.models import weights_label
from gpfq.runner.preprocessing import check_model_and_data
from gpfq.runner.run_config import Point, RunConfig

# The quantization hyperparameters are gpfq.QuantConfig's fields; the other header keys say what is run where.
GRID_KEYS = ("model_name",) + GRID_FIELDS
# Header keys that are not quantization hyperparameters, and the log column of those that have one.
RUN_COLUMNS = {"model_name": "Model Name", "dataset": "Dataset", "author": "Author", "weights": "Weights",
               "eval_subset": "Eval Subset"}
RUN_KEYS = ("model_name", "dataset", "weights", "author", "num_workers", "num_threads", "device", "resume",
            "log_dir", "model_dir", "data_dir", "image_size", "export_onnx", "export_qdq", "debug", "checkpoint",
            "eval_subset")
# Keys whose value is itself a list (never expanded).
LIST_KEYS = ("ignore_layers",)
CLI_ALIASES = {"model_name": ["--model"]}
# The header keys a RunConfig takes (its `options` are the variant's, its `header` the whole point).
RUN_FIELDS = tuple(item.name for item in dataclasses.fields(RunConfig) if item.name not in ("options", "header"))
# Keys every variant understands, whether or not its header lists them.
# debug: known errors show their stack (gpfq.runner.cli).
# checkpoint: per-layer checkpoints of the plain script, 'auto', True or False (gpfq.pipeline.checkpoint).
# eval_subset: None (the whole evaluation set) or N, a class-balanced N of its images (gpfq.io.data.eval_subset).
COMMON_DEFAULTS = {"resume": False, "image_size": None, "export_onnx": False, "export_qdq": False, "debug": False,
                   "checkpoint": "auto", "eval_subset": None}


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are short: the error and one line of usage, not the usage of every header name."""

    def short_usage(self) -> str:
        return f"usage: {self.prog} [--NAME VALUE ...], NAME any header name ({self.prog} --help lists them)"

    def error(self, message):
        self.exit(2, f"error: {message}\n{self.short_usage()}\n")


def _unknown_options(extras: list, flags: list) -> str:
    """The error for the tokens argparse could not place: each unknown --flag with the closest valid one."""
    described, after_flag = [], False
    for token in extras:
        if token.startswith("-"):
            flag = token.split("=", 1)[0]
            close = difflib.get_close_matches(flag, flags, n=1)
            described.append(f"{flag}" + (f" (did you mean {close[0]}?)" if close else ""))
            after_flag = True
        elif not after_flag:  # a value before any option: it belongs to none
            described.append(f"{token!r} (a value must follow its --NAME)")
    kind = "unknown option" if any(token.startswith("-") for token in extras) else "unexpected value"
    return f"{kind}{'s' if len(described) > 1 else ''} {', '.join(described)}"


# --help's line for the keys every variant understands, which a script's header may not describe
COMMON_HELP = {"resume": "True: skip grid points already in the log, and go on from an interrupted one's checkpoint",
               "image_size": "imagefolder: side of the prepared images (None: the model's own preprocessing)",
               "export_onnx": "True: also write <stem>.onnx beside the quantized model file (and <stem>.int8.onnx "
                              "with act_bits 8)",
               "export_qdq": "True (with act_bits 8): also write <stem>.int8.onnx, the integer model ONNX Runtime runs "
                             "on int8 kernels",
               "debug": "True: known errors show their stack trace too",
               "checkpoint": "per-layer checkpoints: 'auto', True or False",
               "eval_subset": "None: the whole evaluation set; N: a class-balanced N images",
               "log_dir": "folder of the CSV logs (None: logs/)", "model_dir": "folder of the models (None: models/)",
               "data_dir": "folder of the datasets (None: data/)"}


def header_comments(path) -> dict:
    """{name: comment} of a script's `name = value  # comment` lines; a comment-only line below one, its `#` in the
    same column, continues the comment."""
    import tokenize
    comments, name, column, last_row, pending = {}, None, None, None, None
    with open(path, "rb") as f:
        tokens = list(tokenize.tokenize(f.readline))
    for position, token in enumerate(tokens):
        row, col = token.start
        if token.type == tokenize.NAME and col == 0 and position + 1 < len(tokens) and tokens[position + 1].string == "=":
            pending, name = token.string, None
        elif token.type == tokenize.COMMENT:
            text = token.string.lstrip("#").strip()
            if pending is not None:  # `name = value  # comment` (the value may span lines)
                name, column, last_row, pending = pending, col, row, None
                comments[name] = text
            elif name is not None and col == column and row == last_row + 1 and token.line.lstrip().startswith("#"):
                comments[name] += " " + text
                last_row = row
            else:
                name = None
        elif token.type == tokenize.NEWLINE:
            pending = None
    return comments


def _script_comments(header: dict) -> dict:
    """`header_comments` of the script running as __main__ whose HEADER is `header` (else {})."""
    import sys
    main = sys.modules.get("__main__")
    if getattr(main, "HEADER", None) is not header or not getattr(main, "__file__", None):
        return {}
    try:
        return header_comments(main.__file__)
    except (OSError, SyntaxError):
        return {}


def parse_overrides(header: dict, argv=None) -> dict:
    """Header values replaced by any `--name value [value …]` given on the command line.

    A name given with no value is set to True (`--resume`). --help shows each key's header comment and default.
    """
    comments = {**COMMON_HELP, **_script_comments(header)}
    header = {**COMMON_DEFAULTS, **header}
    parser = _Parser(description="GPFQ quantization. Every header name can be overridden: "
                                 "--bits 3 4 --model resnet18")
    all_flags = []
    for key, default in header.items():
        flags = [f"--{key}"] + ([f"--{key.replace('_', '-')}"] if "_" in key else []) + CLI_ALIASES.get(key, [])
        parser.add_argument(*flags, dest=key, nargs="*", default=None, metavar="VALUE",
                            help=((f"{comments[key]} " if key in comments else "") + f"(header: {default!r})").replace("%", "%%"))
        all_flags += flags
    args, extras = parser.parse_known_args(argv)
    if extras:
        parser.error(_unknown_options(extras, all_flags))
    config = dict(header)
    for key, values in vars(args).items():
        if values is None:
            continue
        parsed = [_literal(v) for v in values]
        if key in LIST_KEYS:
            config[key] = parsed
        elif not parsed:
            config[key] = True
        elif len(parsed) == 1:
            config[key] = parsed[0]
        else:
            config[key] = parsed
    return config


def _literal(text: str):
    if text.lower() in ("none", "null"):
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _distinct(values) -> list:
    """`values` without repeats (equal and of the same type: 4 and 4.0 stay two, for `validate` to judge)."""
    kept = []
    for value in values:
        if not any(type(value) is type(other) and value == other for other in kept):
            kept.append(value)
    return kept


def expand_grid(config: dict, grid_keys=(), say=None) -> list:
    """Every combination of the list-valued GRID_KEYS (and a variant's `grid_keys`), as one flat config each.

    A value listed twice (`--bits 4 4`) gives its points once; `say`, if given, is told so.
    """
    keys = GRID_KEYS + tuple(k for k in grid_keys if k not in GRID_KEYS)
    axes = {k: (config[k] if isinstance(config[k], (list, tuple)) else [config[k]]) for k in keys if k in config}
    repeated = {k: values for k, values in axes.items() if len(_distinct(values)) < len(values)}
    if repeated:
        before = math.prod(len(values) for values in axes.values())
        axes = {k: _distinct(values) for k, values in axes.items()}
        after = math.prod(len(values) for values in axes.values())
        if say is not None:
            listed = "; ".join(f"{k} {list(values)!r}" for k, values in repeated.items())
            say(f"note: repeated grid values ({listed}): each grid point runs once ({after} point"
                f"{'s' if after != 1 else ''}, not {before})")
    points = []
    for values in itertools.product(*axes.values()):
        point = dict(config)
        point.update(zip(axes.keys(), values))
        points.append(point)
    return points


def quant_config(point: dict) -> QuantConfig:
    """The QuantConfig of a header or grid point (a dict with header keys); keys it lacks take the defaults."""
    values = {name: point[name] for name in FIELDS if name in point}
    if values.get("ignore_layers", ()) is None:
        values["ignore_layers"] = ()
    return QuantConfig(**values)


def parse_point(point: dict, options=None) -> Point:
    """The (QuantConfig, RunConfig) of one grid point; ValueError on its first bad hyperparameter (cheap checks
    only). options(point) -> the variant's own typed options, checking them (`experiment.Variant.options`)."""
    def fail(message):
        raise bad_hyperparameter(message)

    for key, value in point.items():  # grid keys' lists are expanded by now; what is left takes one value
        if isinstance(value, (list, tuple)) and key not in LIST_KEYS:
            fail(f"{key} takes one value, got {len(value)}: {list(value)!r}; it does not expand into a grid "
                 f"(quote a value that has spaces: --{key} 'a b')")
    config = quant_config(point)
    run = RunConfig(**{key: point[key] for key in RUN_FIELDS if key in point}, header=dict(point))
    if isinstance(run.num_workers, bool) or not isinstance(run.num_workers, int) or run.num_workers < 0:
        fail(f"num_workers must be an integer ≥ 0, got {run.num_workers!r}")
    for key in ("resume", "debug"):
        if not isinstance(getattr(run, key), bool):
            fail(f"{key} must be True or False, got {getattr(run, key)!r}")
    if not (run.checkpoint == "auto" or isinstance(run.checkpoint, bool)):
        fail(f"checkpoint must be 'auto', True or False, got {run.checkpoint!r}")
    subset = run.eval_subset
    if subset is not None and (isinstance(subset, bool) or not isinstance(subset, int) or subset < 1):
        fail(f"eval_subset must be None (the whole evaluation set) or an integer ≥ 1, got {subset!r}")
    for key in ("export_onnx", "export_qdq"):
        if not isinstance(getattr(run, key), bool):
            fail(f"{key} must be True or False, got {getattr(run, key)!r}")
    if run.export_qdq and config.act_bits != 8:
        fail(f"export_qdq writes the integer model, which needs quantized activations: add --act_bits 8 (act_bits is "
             f"{config.act_bits!r})")
    missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
    for key in ("export_onnx", "export_qdq"):
        if getattr(run, key) and missing:
            fail(f"{key} needs {' and '.join(missing)}: pip install 'gpfq[onnx]' (onnx, onnxruntime, onnxscript)")
    if run.dataset not in DATASETS:
        fail(f"dataset must be one of {DATASETS}, got {run.dataset!r}")
    threads = run.num_threads
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        fail(f"num_threads must be None (all cores) or an integer ≥ 1, got {threads!r}")
    check_model_and_data(run.model_name, run.dataset, run.image_size, run.data_dir)
    if str(run.device).startswith("cuda") and not torch.cuda.is_available():
        fail(f"device {str(run.device)!r} asked for, but torch sees no CUDA GPU; use device='cpu'")
    if options is not None:
        run = dataclasses.replace(run, options=options(point))
    return Point(config, run)


def method_description(point: dict) -> str:
    """The options that matter for a grid point's method (the log's Method Options column)."""
    return quant_config(point).method_description()


def point_columns(point: Point) -> dict:
    """The log columns a grid point's hyperparameters fill; with a variant's own, they identify the point."""
    config, run = point
    columns = {"Model Name": run.model_name, "Dataset": dataset_label(run.dataset, run.data_dir, run.image_size)}
    columns.update(config.log_columns())
    columns["Weights"] = weights_label(run.model_name, run.weights)  # other weights: another point
    # a subset's accuracy is never read as the full one
    columns["Eval Subset"] = "" if run.eval_subset is None else run.eval_subset
    return columns
