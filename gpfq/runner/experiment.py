"""One experiment = one grid point: load, quantize, save, evaluate, log.

`main(header, argv, variant)` applies command-line overrides to a script's header, checks every
point of the grid (`gpfq.runner.header`), then runs each point, appending one CSV row (`gpfq.runner.logs`) and
saving its model (`gpfq.io.storage`). A script's variant of the procedure (ad hoc improvements,
retraining) plugs in through one `Variant` object; the plain script runs `PLAIN`.

Before any point runs, every bad input is reported with one clear error: the hyperparameters
(`parse_point`, once per point: below it the runner reads a typed `Point`), the result folders and logs, then the
data, the models and their layers (`preflight`).
With `resume`, points whose row is already in the log are skipped. An interrupted grid keeps every
finished row and model.
"""
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from gpfq.paths import __version__
from gpfq.pipeline import distributed
from gpfq.pipeline.coverage import Coverage
from gpfq.pipeline.discovery import check_model_finite, find_layers
from gpfq.pipeline.checkpoint import LayerCheckpoint, weights_hash
from gpfq.config import QuantConfig
from gpfq.io.data import calibration_set, eval_subset, evaluation_loader, evaluation_set
from gpfq.pipeline.streams import CalibrationStream
from gpfq.runner.deploy import FILE_COLUMN, export_beside, export_int8_beside, quantized_path, save_beside, size_columns
from gpfq.errors import ResultWriteError, bad_hyperparameter, os_error_reason
from gpfq.runner.accuracy_cache import cached_accuracy
from gpfq.runner.evaluate import CHANCE_MARGIN, chance_warnings, classes_in, evaluate  # noqa: F401
from gpfq.pipeline.folding import fold_batchnorm
from gpfq.runner.header import (CLI_ALIASES, COMMON_DEFAULTS, GRID_KEYS, LIST_KEYS, RUN_COLUMNS, RUN_KEYS,  # noqa: F401
                     expand_grid, method_description, parse_overrides, parse_point, point_columns)
from gpfq.runner.logs import append_row, check_log, read_rows
from gpfq.io.models import load_model, published_accuracy, weights_label
from gpfq.pipeline.reports import check_layer_indices, reports_as_dicts, zero_fraction
from gpfq.paths import DATA_DIR, LOG_DIR, MODEL_DIR
from gpfq.runner.preprocessing import check_model_takes, image_folder_sets
from gpfq.runner.resume import pending_points, point_identity
from gpfq.runner.run_config import Point, RunConfig
from gpfq.runner.variant import PLAIN, Variant, plain_quantize  # noqa: F401
from gpfq.io.storage import check_writable, code_revision, display_path, save_model, write_record  # noqa: F401
from gpfq.io.user_models import model_folder


# ---------------------------------------------------------------- running
class Resources:
    """Datasets, models and float accuracies shared by the points of one grid."""

    def __init__(self):
        self._cache = {}

    def get(self, key, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]


def float_accuracy(point: Point, model, resources, loader_of, log=print):
    """torchvision's published numbers for its own weights, otherwise measured once per model, data and settings
    (kept on disk across runs: gpfq.runner.accuracy_cache)."""
    config, run = point
    if (run.weights == "DEFAULT" and run.dataset == "imagenet" and run.eval_subset is None
            and published_accuracy(run.model_name) is not None):
        return published_accuracy(run.model_name)

    def measured():
        loader = loader_of()
        measure = lambda: evaluate(model, loader, device=run.device, desc="float model")  # noqa: E731
        if distributed.current().active:  # every rank must join the evaluation's all-reduce: a cache one rank
            return measure()              # (or one machine's home) holds and another does not would hang it
        return cached_accuracy(model, getattr(loader, "dataset", None), run.device, log=log, measure=measure)
    return resources.get(("float", run.model_name, str(run.weights), config.fold_batchnorm, run.eval_subset), measured)


@dataclass
class Context:
    """What one grid point works with, shared with the variants' quantize functions."""
    config: QuantConfig  # how its layers are quantized
    run: RunConfig  # model, data, folders, execution; `run.options`: the variant's own
    calibration: object
    evaluation: object
    analog_model: torch.nn.Module
    original_top1: float
    original_top5: float
    log: object
    checkpoint: object = None  # a checkpoint.LayerCheckpoint (the plain script's), or None

    @property
    def point(self) -> Point:
        return Point(self.config, self.run)

    @property
    def device(self) -> str:
        return self.run.device

    def stream(self) -> CalibrationStream:
        """A fresh seeded calibration stream (the same images for the same seed)."""
        return CalibrationStream(self.calibration, self.config.seed, chunk_size=self.run.chunk_size,
                                 num_workers=self.run.num_workers)

    def loader(self):
        return evaluation_loader(self.evaluation, self.run.eval_batch_size, self.run.num_workers)


def load_inputs(point: Point, resources: Resources):
    """(calibration set, evaluation set, float model) of a grid point, loaded once per grid."""
    config, run = point
    data_dir = Path(run.data_dir or DATA_DIR)
    # Random weights are drawn from the point's seed: a rerun (or --resume) rebuilds the same network.
    seed = config.seed if run.weights == "random" else None
    analog_model = resources.get(("model", run.model_name, str(run.weights), seed),
                                 lambda: load_model(run.model_name, run.weights, seed=seed or 0))
    if run.dataset == "imagefolder":  # prepared as the model declares (gpfq.runner.preprocessing)
        calibration, evaluation = resources.get(
            ("imagefolder", str(data_dir), run.model_name, run.image_size),
            lambda: image_folder_sets(run.model_name, analog_model, data_dir, run.image_size))
        return calibration, evaluation, analog_model
    calibration = resources.get(("calibration", run.dataset, str(data_dir)),
                                lambda: calibration_set(run.dataset, data_dir))
    evaluation = resources.get(("evaluation", run.dataset, str(data_dir)),
                               lambda: evaluation_set(run.dataset, data_dir))
    return calibration, evaluation, analog_model


def check_batch_size(key: str, m: int, calibration) -> None:
    if m > len(calibration):
        raise bad_hyperparameter(f"{key} {m} is larger than the calibration set ({len(calibration)} images)")


@dataclass
class ModelFacts:
    """What `preflight` learns about a grid point's model and data, for a variant's `validate_model`."""
    layer_names: list  # the Conv2d/Linear layers in execution order (what layer indices count)
    model: torch.nn.Module  # the float model
    calibration_size: int
    evaluation_size: int
    example: torch.Tensor  # one calibration input (1, …), on the model's device


def coverage_columns(reports) -> dict:
    """The coverage columns of a row (blank when the reports carry no coverage, e.g. a loaded model)."""
    coverage = getattr(reports, "coverage", None)
    if coverage is None:
        return {"Quantized Tensors": "", "Quantized Parameters": "", "Largest Float": ""}
    return coverage.columns()


def preflight(points: list, resources: Resources, validate_model=None) -> None:
    """Load every point's data and float model (kept in `resources` for the run) and check, before any
    point runs: m against the calibration set, NaN/Inf in the model (naming the parameter or layer),
    ignore_layers against the model's layers, and the variant's validate_model(point, ModelFacts)."""
    for point in points:
        config, run = point
        calibration, evaluation, model = load_inputs(point, resources)
        check_batch_size("batch_size", config.batch_size, calibration)
        if run.eval_subset is not None:  # a subset the set cannot give is found before any work
            resources.get(("eval_subset", id(evaluation), run.eval_subset),  # the set lives in resources
                          lambda: eval_subset(evaluation, run.eval_subset))

        def checked_layers():
            check_model_takes(run.model_name, model, run.dataset, calibration)
            example = calibration[0][0].unsqueeze(0).to(next(model.parameters()).device)
            check_model_finite(model, example)
            discovery = find_layers(model, example)
            return [layer.name for layer in discovery.layers], Coverage.of(discovery).warning()
        names, coverage_warning = resources.get(("layers", run.model_name, str(run.weights)), checked_layers)
        if coverage_warning and config.strict_coverage:
            raise bad_hyperparameter(f"strict_coverage is on, and {coverage_warning}")
        check_layer_indices("ignore_layers", config.ignore_layers, names)
        if validate_model is not None:
            example = calibration[0][0].unsqueeze(0).to(next(model.parameters()).device)
            validate_model(point, ModelFacts(names, model, len(calibration), len(evaluation), example))


def prepare(point: Point, resources: Resources, log=tqdm.write) -> Context:
    """Load (or reuse) the data and float model of a grid point and its float accuracy."""
    config, run = point
    torch.manual_seed(config.seed)
    calibration, evaluation, analog_model = load_inputs(point, resources)
    check_batch_size("batch_size", config.batch_size, calibration)
    if config.fold_batchnorm:
        def folded():
            model, pairs = fold_batchnorm(analog_model)
            log(f"folded {len(pairs)} BatchNorm layers into their Conv2d/Linear layers")
            return model
        analog_model = resources.get(("folded model", run.model_name, str(run.weights)), folded)
    if run.eval_subset is not None:
        evaluation = resources.get(("eval_subset", id(evaluation), run.eval_subset),  # the set lives in resources
                                   lambda: eval_subset(evaluation, run.eval_subset))
        log(f"eval_subset: accuracy on a class-balanced {len(evaluation)} images of the evaluation set (the first of "
            f"each class), logged in the Eval Subset column")
    context = Context(config, run, calibration, evaluation, analog_model, 0.0, 0.0, log)
    context.original_top1, context.original_top5 = float_accuracy(point, analog_model, resources, context.loader, log)
    return context


def run_point(point: Point, resources: Resources, variant: Variant = PLAIN, log=tqdm.write, unlogged=None) -> dict:
    """Quantize (`variant.quantize`), save, evaluate and log one grid point; returns the logged row.
    unlogged: a list holding the point's saved files until its row is logged (`main` drops them at Ctrl-C)."""
    unlogged = [] if unlogged is None else unlogged
    model_dir = Path(point.run.model_dir or MODEL_DIR) / model_folder(point.run.model_name)
    log_paths = [Path(point.run.log_dir or LOG_DIR) / name for name in variant.log_names_of(point)]
    context = prepare(point, resources, log)
    context.checkpoint = point_checkpoint(point, model_dir, variant, log, context.analog_model)
    try:
        return _quantize_save_log(context, variant, model_dir, log_paths, log, unlogged)
    finally:  # logged or not, the point's run is over: its checkpoint's lock goes (the checkpoint stays if unlogged)
        if context.checkpoint is not None:
            context.checkpoint.release()


def _quantize_save_log(context: Context, variant: Variant, model_dir: Path, log_paths: list, log, unlogged) -> dict:
    """run_point's work once the point is prepared: quantize, save, evaluate, log; returns the row."""
    point, config, run = context.point, context.config, context.run
    own_options = {key: value for key, value in variant.own_columns(point).items() if value not in ("", None)}
    log(f"== {run.model_name} ({weights_label(run.model_name, run.weights)}) {config.method} "
        f"{config.method_description()} {config.bits} bits, m={config.batch_size}, "
        f"C=({config.mlp_scalar}, {config.cnn_scalar}), {config.alphabet_granularity} alphabets, "
        f"seed {config.seed}" + "".join(f", {key} {value}" for key, value in own_options.items()))
    start = time.time()
    quantized_model, reports, extra = variant.quantize(context)
    seconds = time.time() - start

    prefix = variant.file_prefix(point) if variant.file_prefix is not None else variant.name
    stem = (f"{prefix + '_' if prefix else ''}{config.method}_{config.alphabet}"
            f"_{config.alphabet_granularity}_b{config.bits}_m{config.batch_size}"
            f"_mlp{config.mlp_scalar}_cnn{config.cnn_scalar}_s{config.seed}_{time.strftime('%Y%m%d-%H%M%S')}")
    record = {"hyperparameters": dict(run.header), "layers": reports_as_dicts(reports), "extra": extra,
              "quantization_seconds": seconds, "package_version": __version__, "code_revision": code_revision()}
    shard = distributed.current()  # several ranks: only rank 0 writes, the others learn the path
    record["world_size"], record["backend"] = shard.world_size, shard.backend or "none"
    # Saved before evaluation, so a crash there leaves the quantized model on disk.
    with shard.step("saving the quantized model (rank 0)"):
        saved = None
        if shard.writer:
            saved = save_results(quantized_model, reports, record, model_dir, stem, point,
                                 context.calibration[0][0].shape, log)
            unlogged.extend([saved[0], saved[0].with_suffix(".json"), quantized_path(saved[0])])
    saved = shard.broadcast_object(saved, "sharing the saved files' paths") if shard.active else saved
    model_path, quantized_file, size = saved

    top1, top5 = evaluate(quantized_model, context.loader(), device=context.device, desc="quantized model")
    warnings = [f"{report.name}: {warning}" for report in reports for warning in report.warnings]
    n_classes = classes_in(context.evaluation)
    warnings += (chance_warnings(top1, n_classes) if n_classes else
                 chance_warnings(top1, output_width(context), "outputs of the model: the data's classes are unknown"))
    for warning in warnings:
        log(f"WARNING: {warning}")
    record["results"] = {"original_top1": context.original_top1, "original_top5": context.original_top5,
                         "quantized_top1": top1, "quantized_top5": top5, "warnings": warnings}
    record["quantized_model_file"] = dict(path=str(quantized_file), **asdict(size)) if size else None
    where = (f"The quantized model is saved at {model_path}, its record (hyperparameters, per-layer errors) at "
             f"{model_path.with_suffix('.json')}; top-1 {context.original_top1:.4f} -> {top1:.4f}, top-5 "
             f"{context.original_top5:.4f} -> {top5:.4f}.")
    with shard.step("writing the record (rank 0)"):
        if shard.writer:
            try:
                write_record(model_path.with_suffix(".json"), record)
            except OSError as error:
                raise ResultWriteError(f"could not add the results to {model_path.with_suffix('.json')} "
                                       f"({os_error_reason(error)}). {where}") from error
    row = point_columns(point)
    row.update(variant.own_columns(point))
    row.update({
        "Original Top1 Accuracy": round(context.original_top1, 6), "Quantized Top1 Accuracy": round(top1, 6),
        "Original Top5 Accuracy": round(context.original_top5, 6), "Quantized Top5 Accuracy": round(top5, 6),
        "Author": run.author, "Sparsity": round(zero_fraction(reports), 6),
        "Quantization Seconds": round(seconds, 2), "Model File": display_path(model_path),
        "Package Version": __version__, "Code Revision": record["code_revision"],
        "Date": time.strftime("%Y-%m-%d %H:%M:%S"),
        FILE_COLUMN: display_path(quantized_file) if quantized_file else "", **size_columns(size),
        "World Size": shard.world_size, "Backend": record["backend"], "Warnings": "; ".join(warnings),
    })
    row.update(coverage_columns(reports))
    row.update(extra)
    # The result is on the console before the append, which can wait for a lock or fail (the model is saved).
    log(f"top-1 {context.original_top1:.4f} -> {top1:.4f}, top-5 {context.original_top5:.4f} -> {top5:.4f}")
    with shard.step("appending the log row (rank 0)"):
        for log_path in log_paths if shard.writer else []:
            append_row(log_path, row, variant.logs[log_path.name], saved=where)
    unlogged.clear()
    if context.checkpoint is not None:  # the row holds the point now
        context.checkpoint.remove()
    log(f"row appended to {', '.join(str(p) for p in log_paths)}")
    if run.export_onnx and quantized_file is not None and shard.writer:
        export_beside(quantized_file, log)  # with act_bits, <stem>.int8.onnx too
    elif run.export_qdq and quantized_file is not None and shard.writer:
        export_int8_beside(quantized_file, log)
    return row


def save_results(model, reports, record, model_dir: Path, stem: str, point: Point, input_shape, log):
    """Save the .pt and its record (`save_model`), then the quantized model file beside them; returns
    (.pt path, quantized file, SizeReport). A failed write is one ResultWriteError saying which files of the
    point were saved (each complete) and which were not."""
    written = []
    try:
        model_path = save_model(model, record, model_dir, stem, written)
        log(f"saved {model_path}")
        return (model_path,) + tuple(save_beside(model, reports, model_path, point, input_shape, log))
    except OSError as error:
        if not written:
            raise ResultWriteError(f"could not save the quantized model in {model_dir} ({os_error_reason(error)}); "
                                   f"nothing of this grid point was written") from error
        model_path = written[0]
        missing = [model_path.with_suffix(".json")] if len(written) == 1 else []
        missing.append(model_path.with_suffix(".safetensors"))
        raise ResultWriteError(f"could not write {missing[0]} ({os_error_reason(error)}); saved: "
                               f"{' and '.join(str(path) for path in written)}; not saved: "
                               f"{', '.join(path.name for path in missing)}, the evaluation and the log row"
                               ) from error


def point_checkpoint(point: Point, model_dir: Path, variant: Variant, log, analog_model=None):
    """The point's per-layer checkpoint (gpfq.pipeline.checkpoint) in its model folder; None when off or when the variant
    keeps state outside the layer loop (`Variant.layer_checkpoints`: the retraining variant). Its identity holds a
    hash of the float weights, so a checkpoint made from other weights is never restored."""
    run, mode = point.run, point.run.checkpoint
    if mode is False:
        return None
    if not variant.layer_checkpoints:
        if mode is True:
            log(f"checkpoint: the {variant.name} variant has no per-layer checkpoints (its state lives outside the "
                f"layer loop); an interrupted point restarts from its first layer")
        return None
    if distributed.current().active:  # each rank's share of the stream lives in gpfq.pipeline.distributed
        return None
    identity = point_identity(point, variant.logs[variant.log_names_of(point)[0]], variant)
    identity.update(chunk_size=run.chunk_size, device=str(run.device))
    return LayerCheckpoint(model_dir, identity, code_revision(), mode, run.resume, log,
                           weights_hash(analog_model) if analog_model is not None else "")


@torch.no_grad()
def output_width(context: Context) -> int:
    """The model's output width on one calibration image (the number of classes when the data's is unknown)."""
    example = context.calibration[0][0].unsqueeze(0).to(context.device)
    return int(context.analog_model.eval().to(context.device)(example).shape[-1])


def main(header: dict, argv=None, variant: Variant = PLAIN) -> list:
    """Run the grid of a script's header (with command-line overrides); returns the logged rows."""
    config = parse_overrides(header, argv)
    # Under torchrun: join the process group, and compare a hash of the settings on every rank before any work.
    shard = distributed.launch(config.get("device", "cpu"))
    shard.check_same(config)
    say = print if shard.writer else _quiet
    with shard.step("checking the hyperparameters"):
        points = expand_grid(config, variant.grid_keys, say)
        if variant.resolve_point is not None:
            points = [variant.resolve_point(point) for point in points]
        # every point checked, and parsed into its QuantConfig and RunConfig, before any work starts
        points = [parse_point(point, variant.options) for point in points]
    log_dir = Path(config.get("log_dir") or LOG_DIR)
    model_dir = Path(config.get("model_dir") or MODEL_DIR)
    log_names = list(dict.fromkeys(n for point in points for n in variant.log_names_of(point)))
    with shard.step("checking the result folders and logs (rank 0)"):
        if shard.writer:  # only rank 0 writes, so only its folders and logs matter
            check_writable(log_dir, "log_dir")
            check_writable(model_dir, "model_dir")
            for name in dict.fromkeys(model_folder(p.run.model_name) for p in points):  # models/<model folder>/
                if (model_dir / name).exists():
                    check_writable(model_dir / name, "model_dir")
            for name in log_names:
                check_log(log_dir / name, variant.logs[name])
            if config["resume"]:
                total = len(points)
                points = pending_points(points, log_dir, variant)
                say(f"resume: {total - len(points)} of {total} grid points are already in {', '.join(log_names)}; "
                    f"running the other {len(points)}")
    if config["resume"] and shard.active:
        points = shard.broadcast_object(points, "sharing the grid points still to run")
    # On a machine shared with other jobs, fewer threads than cores avoids oversubscription, which slows
    # the small per-column products of the quantizers many times over.
    # The caller's thread count comes back at the end: main() is also called in-process (tests, notebooks).
    caller_threads = torch.get_num_threads()
    torch.set_num_threads(config.get("num_threads") or distributed.threads_per_rank())
    try:
        resources = Resources()
        with shard.step("loading the data and the models"):
            preflight(points, resources, variant.validate_model)
        rows, number, unlogged = [], 0, []
        try:
            for number, point in enumerate(points, 1):
                if len(points) > 1:
                    say(f"\n### grid point {number}/{len(points)}")
                rows.append(run_point(point, resources, variant, log=tqdm.write if shard.writer else _quiet,
                                      unlogged=unlogged))
        except Exception as error:
            shard.record_error(error)  # where the other ranks' diagnosis finds it
            raise
        except KeyboardInterrupt:
            if unlogged and _logged(unlogged[0], [log_dir / name for name in log_names]):
                unlogged.clear()  # its row landed just before the Ctrl-C: the point is finished, its files stay
            for path in unlogged:  # the interrupted point's files, saved but not logged: --resume recomputes it
                path.unlink(missing_ok=True)
            if shard.writer:  # every rank is interrupted (Ctrl-C reaches them all, or `Shard.step` passes it on)
                print(f"\ninterrupted during grid point {number} of {len(points)}: the rows of the finished points are "
                      f"in {', '.join(str(log_dir / n) for n in log_names)}, their models in {model_dir}. Run the same "
                      f"command with --resume to go on.", file=sys.stderr)
            raise SystemExit(130) from None
    finally:
        torch.set_num_threads(caller_threads)
    return rows


def _logged(model_path: Path, logs: list) -> bool:
    """Whether a row of one of `logs` names `model_path` in its Model File column."""
    name = display_path(model_path)
    return any(row.get("Model File") == name for log in logs if log.is_file() for row in read_rows(log))


def _quiet(*args, **kwargs):
    """The log of ranks other than 0: rank 0 speaks for all."""
