"""Coverage: which parameters were quantized and which stayed float, and why (docs/capture.md)."""
from dataclasses import dataclass, field

from gpfq.pipeline.discovery import Discovery


@dataclass
class Coverage:
    """Which parameters were quantized and which stayed float, and why. Each list holds (name, size, why)."""
    quantized: list = field(default_factory=list)  # matmul weights quantized
    chosen_float: list = field(default_factory=list)  # matmul weights left float by the settings (ignore_layers, …)
    unsupported: list = field(default_factory=list)  # matmul weights that cannot be quantized
    by_design: list = field(default_factory=list)  # read by the forward pass, but not as a matmul weight
    unused: list = field(default_factory=list)  # never read by the forward pass

    WARN_FRACTION = 0.05

    @classmethod
    def of(cls, discovery: Discovery, quantized_parameters=None):
        """quantized_parameters: names of the weights quantized (None: every layer, the plan)."""
        layer_parameters = {layer.parameter for layer in discovery.layers}
        quantized_parameters = layer_parameters if quantized_parameters is None else set(quantized_parameters)
        coverage = cls()
        for name, size in discovery.sizes.items():
            if name in quantized_parameters:
                coverage.quantized.append((name, size, "quantized"))
            elif name in layer_parameters:
                coverage.chosen_float.append((name, size, "left float by the settings"))
            elif name in discovery.unsupported:
                coverage.unsupported.append((name, size, discovery.unsupported[name]))
            elif name in discovery.other_uses and name in discovery.weight_parameters:
                ops = ", ".join(sorted(discovery.other_uses[name]))
                coverage.unsupported.append((name, size, f"a layer's weight read by {ops}, not as the weight of "
                                                         f"linear/conv/matmul"))
            elif name in discovery.other_uses:
                coverage.by_design.append((name, size, "read by " + ", ".join(sorted(discovery.other_uses[name]))))
            else:
                coverage.unused.append((name, size, "not used by the forward pass"))
        return coverage

    @staticmethod
    def _total(entries) -> int:
        return sum(size for _, size, _ in entries)

    @property
    def matmul_parameters(self) -> int:
        return self._total(self.quantized) + self._total(self.chosen_float) + self._total(self.unsupported)

    @property
    def unsupported_fraction(self) -> float:
        """Fraction of the matmul weights' parameters that cannot be quantized."""
        return self._total(self.unsupported) / self.matmul_parameters if self.matmul_parameters else 0.0

    def floats(self) -> list:
        return self.chosen_float + self.unsupported + self.by_design + self.unused

    def largest_float(self, count: int = 3) -> list:
        return sorted(self.floats(), key=lambda entry: -entry[1])[:count]

    def columns(self) -> dict:
        """The log's coverage columns."""
        tensors = len(self.quantized) + len(self.floats())
        parameters = self._total(self.quantized) + self._total(self.floats())
        return {"Quantized Tensors": f"{len(self.quantized)}/{tensors}",
                "Quantized Parameters": f"{self._total(self.quantized)}/{parameters}",
                "Largest Float": " ".join(f"{name}({size})" for name, size, _ in self.largest_float())}

    def summary(self) -> str:
        matmul = len(self.quantized) + len(self.chosen_float) + len(self.unsupported)
        lines = [f"coverage: {len(self.quantized)} of {matmul} matmul weights quantized "
                 f"({self._total(self.quantized):,} of {self.matmul_parameters:,} parameters); left float: "
                 f"{len(self.chosen_float)} by the settings, {len(self.unsupported)} unsupported "
                 f"({self.unsupported_fraction:.1%} of the matmul parameters), {len(self.by_design)} other "
                 f"tensors by design ({self._total(self.by_design):,} parameters: norms, biases, embeddings, …), "
                 f"{len(self.unused)} unused ({self._total(self.unused):,})"]
        for name, size, why in self.largest_float():
            lines.append(f"  largest float: {name} ({size:,}): {why}")
        return "\n".join(lines)

    def warning(self):
        """The warning when more than 5 % of the matmul parameters cannot be quantized, else None."""
        if self.unsupported_fraction <= self.WARN_FRACTION:
            return None
        names = ", ".join(f"{name} ({why})" for name, _, why in sorted(self.unsupported, key=lambda e: -e[1])[:3])
        return (f"{self.unsupported_fraction:.1%} of this model's matmul parameters cannot be quantized and stay "
                f"float (more than {self.WARN_FRACTION:.0%}): {names}; the reported bits describe only the "
                f"quantized layers (strict_coverage refuses such a model)")
