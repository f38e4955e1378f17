"""What the layer loop calls besides the rule: the log, a hook after each layer, per-layer checkpoints (saving the
loop's state and continuing from it), and a hook on the quantized copy before the first layer."""
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from tqdm import tqdm

from gpfq.methods.gpfq.engine import GramStatistics
from gpfq.pipeline.checkpoint import reports_from_state, reports_state
from gpfq.pipeline.reports import LayerReport


@dataclass
class Hooks:
    """log(line): where the per-layer lines go. after_layer(LayerStep): runs after each quantized layer (bias
    correction, retraining). checkpoint: a `checkpoint.LayerCheckpoint`, saved after each quantized layer and
    continued from (not with in_place, after_layer or several ranks, whose state lives outside the loop).
    prepare_quantized(quantized_model): runs once on the copy before the first layer (with in_place, on the model
    itself): `gpfq.quantize` installs the activation quantizers there, so every X̃ is the fake-quantized input."""
    log: Callable = tqdm.write
    after_layer: Callable = None
    checkpoint: object = None
    prepare_quantized: Callable = None


@dataclass
class LayerStep:
    """What `after_layer` sees once a layer is quantized. Rows and weights are per group (G, …).

    For the Gram form, `statistics` holds the rows' sums (X̃ᵀX, X̃ᵀX̃, column sums, row count); the
    rows themselves are None unless `Calibration(keep_rows=True)` kept them.
    """
    report: LayerReport
    analog_layer: nn.Module
    quantized_layer: nn.Module
    analog_model: nn.Module
    quantized_model: nn.Module
    analog_rows: torch.Tensor  # (G, m, N0), or None when streamed
    quantized_rows: torch.Tensor  # (G, m, N0), or None when streamed
    weight: torch.Tensor  # (G, N1, N0), float
    quantized_weight: torch.Tensor  # (G, N1, N0)
    statistics: GramStatistics = None


@dataclass
class LoopState:
    """The layer loop's state that a checkpoint saves and restores: the layer names, the partly quantized model, the
    patch generator, the calibration stream's position and the reports so far."""
    names: list
    model: nn.Module
    generator: torch.Generator
    stream: object
    reports: list

    def save(self, checkpoint, index: int) -> None:
        """Hand the checkpoint the state after layer `index` (it writes it if due)."""
        checkpoint.after_layer(index, lambda: {
            "next_index": index + 1, "layers": self.names, "model": self.model.state_dict(),
            "generator": self.generator.get_state(),
            "stream": self.stream.state() if hasattr(self.stream, "state") else None,
            "reports": reports_state(self.reports)})

    def resume(self, checkpoint, log) -> int:
        """Restore a matching checkpoint into the loop's state; the index of the layer to go on at (0: afresh)."""
        names, stream = self.names, self.stream
        state = checkpoint.load(names) if checkpoint is not None else None
        if state is None:
            return 0
        if state["stream"] is not None:
            if not hasattr(stream, "restore"):
                log(f"checkpoint: ignoring {checkpoint.path} (this calibration stream cannot be restored)")
                return 0
            before = stream.state()
            try:
                stream.restore(state["stream"])
            except (ValueError, KeyError, RuntimeError) as error:
                stream.restore(before)
                log(f"checkpoint: ignoring {checkpoint.path} ({type(error).__name__}: {error}); starting the point "
                    f"afresh")
                return 0
        self.model.load_state_dict(state["model"])
        self.generator.set_state(state["generator"])
        self.reports.extend(reports_from_state(state["reports"], LayerReport))
        index = state["next_index"]
        log(f"checkpoint: layers 1-{index} of {len(names)} restored from {checkpoint.path}; continuing from layer "
            f"{index} ({names[index - 1]}) with layer {index + 1}")
        return index
