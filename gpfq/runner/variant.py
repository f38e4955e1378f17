"""How a script's procedure plugs into the runner (`experiment.main`): one `Variant` object; `PLAIN` is the plain
script's (the paper's GPFQ)."""
from dataclasses import dataclass, field
from typing import Callable, Optional

from gpfq import api
from gpfq.runner.logs import PLAIN_COLUMNS, PLAIN_LOG
from gpfq.runner.run_config import Point


def plain_quantize(context):
    """The paper's GPFQ: every layer with the header's settings (context: an `experiment.Context`). Returns (model,
    reports, {})."""
    result = api.quantize(context.analog_model, context.stream(), context.config, device=context.device,
                          log=context.log, checkpoint=context.checkpoint)
    return result.model, result.reports, {}


@dataclass(frozen=True)
class Variant:
    """How a script's procedure plugs into `main`; the defaults are the plain script's (the paper's GPFQ).

    quantize(context) -> (quantized model, [LayerReport], extra columns for the row).
    A `point` below is a parsed `Point` (config, run); the variant's own options are `point.run.options`.
    logs: {log file name: its columns}; log_names(point) -> the logs a point's row goes to (default: all).
    header_keys: the keys the variant adds to the plain header; grid_keys: those that expand into a grid.
    columns(point) -> {column: value}: the variant's own hyperparameter columns, written into each row and
        used, with `header.point_columns`, to recognise a logged point (`resume`).
    result_columns: the variant's own columns that record results (not hyperparameters).
    resolve_point(point dict) -> point dict runs before parsing (e.g. hyperparameters read from a saved model);
    options(point dict) -> the variant's own options, typed and checked (`header.parse_point`, into
        `run.options`); validate_model(point, ModelFacts) adds checks that need the model's layers or the
        data's size (in `preflight`, before any point runs).
    name: starts the saved models' file names, so variants' models stand apart; file_prefix(point), when
        given, replaces it with one that also names the point's options (e.g. 'adhoc_bias-all').
    layer_checkpoints: whether quantize passes `context.checkpoint` to the layer loop (per-layer resume); off
        for a variant whose state lives outside that loop (retraining's fine-tuned model and optimizer).
    """
    name: str = ""
    file_prefix: Optional[Callable] = None
    quantize: Callable = plain_quantize
    logs: dict = field(default_factory=lambda: {PLAIN_LOG: PLAIN_COLUMNS})
    log_names: Optional[Callable] = None
    header_keys: tuple = ()
    grid_keys: tuple = ()
    columns: Optional[Callable] = None
    result_columns: frozenset = frozenset()
    resolve_point: Optional[Callable] = None
    options: Optional[Callable] = None
    validate_model: Optional[Callable] = None
    layer_checkpoints: bool = True

    def log_names_of(self, point: Point) -> list:
        """The logs a point's row goes to."""
        names = list(self.logs) if self.log_names is None else self.log_names(point)
        return [names] if isinstance(names, str) else list(names)

    def own_columns(self, point: Point) -> dict:
        return self.columns(point) if self.columns is not None else {}


PLAIN = Variant()
