"""Fixed calibration's forward pass: the model's torch.fx graph, run node by node up to each layer in turn."""
import torch
from torch import fx, nn

from gpfq.pipeline.capture import Layer, LayerInput, StopForward, WeightUses, use_collector
from gpfq.pipeline.inputs import placeholder_values, run


def fresh_message(model: nn.Module, error: BaseException) -> str:
    return (f"calibration='fixed' runs the model layer by layer through its torch.fx graph, and "
            f"{type(model).__name__} cannot be run that way ({type(error).__name__}: {error}); "
            f"use calibration='fresh'")


def trace_graph(model: nn.Module, example_input: torch.Tensor = None, layers=None) -> fx.GraphModule:
    """The torch.fx trace of `model`; ValueError (saying: use calibration='fresh') if fx cannot trace it,
    or, given `example_input`, if the traced graph does not run, or does not use the `layers` in their
    order, or does not give the model's output on it."""
    try:
        traced = fx.symbolic_trace(model)
    except Exception as error:  # fx raises several kinds (TraceError, TypeError, …) on dynamic control flow
        raise ValueError(fresh_message(model, error)) from error
    if example_input is None:
        return traced
    try:
        with torch.no_grad():
            order = []
            forward = CachedForward(model, traced, [example_input])
            environment = forward.environments[0]
            with WeightUses(model, lambda name, use: order.append(name) if name not in order else None):
                for node in forward.nodes:
                    if node.op not in ("placeholder", "output"):
                        environment[node] = forward._run(node, environment)
            output = fx.node.map_arg(forward.nodes[-1].args[0], lambda n: environment[n])
            expected = run(model, example_input)
    except Exception as error:
        raise ValueError(fresh_message(model, error)) from error
    if layers is not None and order != [layer.parameter for layer in layers]:
        raise ValueError(fresh_message(model, RuntimeError("its traced graph uses the weights in another order "
                                                           "than the model")))
    if isinstance(expected, torch.Tensor) and not (isinstance(output, torch.Tensor) and output.shape == expected.shape
                                                   and torch.allclose(output, expected, rtol=1e-4, atol=1e-5)):
        raise ValueError(fresh_message(model, RuntimeError("its traced graph does not give the model's output")))
    return traced


class CachedForward:
    """One model's forward pass over fixed image chunks, run node by node up to each layer in turn.

    `inputs_of(layer)` advances from where the last call stopped to the node that first uses the layer's
    weight and returns what the weight is multiplied with, for every chunk. The values later nodes still
    need stay cached, so visiting all layers costs one forward pass (linear in depth) instead of one
    partial pass per layer. The node that uses the weight runs again on the next advance, so a weight
    written in between (its quantization) is what the following layers see. A weight used in several
    nodes (shared) has its later uses captured by a look-ahead on a copy of the cached values.
    """

    def __init__(self, model: nn.Module, traced, chunks):
        self.model = model
        self.traced = traced if isinstance(traced, fx.GraphModule) else None
        graph = traced.graph if isinstance(traced, fx.GraphModule) else traced
        self.nodes = list(graph.nodes)
        self.position = 0
        order = {node: i for i, node in enumerate(self.nodes)}
        # A value can be dropped once the last node that reads it has run.
        self.last_reader = {node: max((order[user] for user in node.users), default=order[node])
                            for node in self.nodes}
        placeholders = [node for node in self.nodes if node.op == "placeholder"]
        self.environments, self.sizes = [], []
        for images in chunks:  # further forward arguments than the inputs give keep their defaults
            self.environments.append(placeholder_values(placeholders, images))
            self.sizes.append(images.shape[0])

    def _attribute(self, target: str):
        value = self.model
        try:
            for part in target.split("."):
                value = getattr(value, part)
        except AttributeError:
            if self.traced is None:
                raise
            value = self.traced  # a constant the trace made (e.g. '_tensor_constant0')
            for part in target.split("."):
                value = getattr(value, part)
        return value

    def _run(self, node, environment):
        args = fx.node.map_arg(node.args, lambda n: environment[n])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: environment[n])
        if node.op == "call_module":
            return self.model.get_submodule(node.target)(*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        if node.op == "get_attr":
            return self._attribute(node.target)
        raise RuntimeError(f"unexpected fx node {node.format_node()}")

    def _advance(self, environment, start: int, mode, drop: bool):
        """Run the nodes from `start` under `mode` until one stops the forward pass; its index (or None)."""
        for index in range(start, len(self.nodes)):
            node = self.nodes[index]
            if node.op in ("placeholder", "output"):
                continue
            try:
                with mode:
                    value = self._run(node, environment)
            except StopForward:
                return index
            environment[node] = value
            if drop:
                for read in list(node.all_input_nodes) + [node]:
                    if self.last_reader[read] <= index and read.op != "placeholder":
                        environment.pop(read, None)
        return None

    @torch.no_grad()
    def inputs_of(self, layer: Layer) -> list:
        """[LayerInput] per chunk: `layer`'s uses, after running every node before its first use."""
        inputs, stop = [], None
        for environment, size in zip(self.environments, self.sizes):
            captured = []
            stop = self._advance(environment, self.position,
                                 WeightUses(self.model, use_collector(layer.parameter, captured, 1)), drop=True)
            if stop is None:
                raise RuntimeError(f"layer {layer.name!r} is not used after the layers already visited")
            if layer.uses > 1:  # the later uses, on a copy that keeps every value
                captured = []
                self._advance(dict(environment), stop,
                              WeightUses(self.model, use_collector(layer.parameter, captured, layer.uses)), drop=False)
            # placeholders are read by the first nodes; drop them once those have run
            for node in [n for n in environment if n.op == "placeholder" and self.last_reader[n] < stop]:
                environment.pop(node)
            inputs.append(LayerInput(captured, size))
        self.position = stop
        return inputs
