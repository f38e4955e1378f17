"""The package's modules import downward only: the graph of gpfq's imports (at any depth of a module,
function-level imports included) has no circle, and every import goes to the same layer or one below it
(docs/design.md): the foundations (errors, paths, threads) < methods < pipeline < io < config < api < runner."""
import ast

from gpfq.paths import REPO_ROOT

PACKAGE = REPO_ROOT / "gpfq"


def module_name(path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path, modules: set) -> set:
    """The gpfq modules `path` imports (`from . import x` counts as gpfq.x when x is a module)."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {name for name in found if name in modules}


def import_graph() -> dict:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(path) for path in paths}
    return {module_name(path): imports_of(path, modules) for path in paths}


def find_circle(graph: dict):
    """One circle [a, b, …, a] of the graph, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state:
                circle = visit(target)
                if circle:
                    return circle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            circle = visit(node)
            if circle:
                return circle
    return None


def test_the_finder_sees_a_circle():
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_gpfq_imports_form_no_circle():
    graph = import_graph()
    assert "gpfq.api" in graph and "gpfq.methods.gpfq.engine" in graph["gpfq.methods.gpfq.variants"]  # the walk sees real edges
    circle = find_circle(graph)
    assert circle is None, "import circle: " + " -> ".join(circle)


LAYERS = [("gpfq.errors", "gpfq.paths", "gpfq.threads"), ("gpfq.methods",), ("gpfq.pipeline",), ("gpfq.io",),
          ("gpfq.config",), ("gpfq.api",), ("gpfq.runner",), ("gpfq",)]


def layer_of(module: str) -> int:
    """The index in LAYERS of the longest prefix that names `module` or a package above it."""
    for depth in range(module.count(".") + 1, 0, -1):
        prefix = ".".join(module.split(".")[:depth])
        for index, names in enumerate(LAYERS):
            if prefix in names:
                return index
    raise KeyError(f"{module} is in no layer of LAYERS: add it where it belongs")


def upward_imports(graph: dict) -> list:
    """(importer, imported) pairs where the imported module sits in a higher layer than the importer."""
    return sorted((a, b) for a, targets in graph.items() for b in targets if layer_of(b) > layer_of(a))


def test_the_layer_check_sees_an_upward_import():
    assert upward_imports({"gpfq.methods.alphabet": {"gpfq.pipeline.network"}}) == [
        ("gpfq.methods.alphabet", "gpfq.pipeline.network")]
    assert upward_imports({"gpfq.pipeline.network": {"gpfq.methods.alphabet", "gpfq.errors"}}) == []


def test_gpfq_imports_go_downward_through_the_layers():
    graph = import_graph()
    assert "gpfq.methods.gpfq.engine" in graph["gpfq.pipeline.calibrator"]  # the walk sees edges across layers
    assert upward_imports(graph) == []


def test_the_embedded_models_blocks_are_torchvisions_module_for_module_and_bit_for_bit():
    """gpfq's copies of ResNet's BasicBlock, MobileNetV2's InvertedResidual and Conv2dNormActivation (written out
    so that the default path never imports torchvision): each embedded model rebuilt from torchvision's own blocks
    has the same modules (names, types, shapes), loads the shipped weights strictly and gives the same logits, bit
    for bit, on real Fashion-MNIST test images, with and without the residual adds' in-place sums."""
    import torch
    from torch import nn
    from torchvision.models.mobilenetv2 import InvertedResidual
    from torchvision.models.resnet import BasicBlock
    from torchvision.ops.misc import Conv2dNormActivation
    from gpfq.io.data import fashion_mnist
    from gpfq.io.models import FashionMobileNet, FashionResNet, load_model

    def torchvision_resnet():
        model = FashionResNet.__new__(FashionResNet)
        nn.Module.__init__(model)
        model.stem = Conv2dNormActivation(1, 16, kernel_size=3)
        stages, width_in = [], 16
        for i, width in enumerate((16, 32, 64)):
            stride = 1 if i == 0 else 2
            down = None if stride == 1 and width_in == width else nn.Sequential(
                nn.Conv2d(width_in, width, 1, stride=stride, bias=False), nn.BatchNorm2d(width))
            stages.append(BasicBlock(width_in, width, stride=stride, downsample=down))
            width_in = width
        model.stages, model.pool, model.fc = nn.Sequential(*stages), nn.AdaptiveAvgPool2d(1), nn.Linear(64, 10)
        return model

    def torchvision_mobilenet():
        model = FashionMobileNet.__new__(FashionMobileNet)
        nn.Module.__init__(model)
        layers, width_in = [Conv2dNormActivation(1, 16, kernel_size=3, stride=2, activation_layer=nn.ReLU6)], 16
        for expand, width, stride in FashionMobileNet.BLOCKS:
            layers.append(InvertedResidual(width_in, width, stride, expand))
            width_in = width
        layers.append(Conv2dNormActivation(width_in, 128, kernel_size=1, activation_layer=nn.ReLU6))
        model.features, model.pool, model.classifier = nn.Sequential(*layers), nn.AdaptiveAvgPool2d(1), nn.Linear(128, 10)
        return model

    images = fashion_mnist("test").tensors[0][:256]
    for name, reference in (("fashion_resnet", torchvision_resnet()), ("fashion_mobilenet", torchvision_mobilenet())):
        ours = load_model(name)
        def structure(model):
            return [(n, type(m).__name__ if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.Linear))
                     else "block", getattr(m, "stride", None), getattr(m, "padding", None), getattr(m, "groups", None))
                    for n, m in model.named_modules()]
        assert structure(ours) == structure(reference), name
        reference.load_state_dict(ours.state_dict(), strict=True)
        reference.eval()
        assert [k for k in ours.state_dict()] == [k for k in reference.state_dict()]
        with torch.no_grad():
            assert torch.equal(ours(images), reference(images)), name


def test_the_default_path_does_not_import_torchvision():
    """`import gpfq`, the runner, the embedded models and Fashion-MNIST leave torchvision (and torch._dynamo, which
    it imports: 1.5-2 s of every script's start) unloaded."""
    import subprocess
    import sys
    from conftest import python_env
    code = ("import sys, gpfq, gpfq.runner.experiment\n"
            "from gpfq.io.models import load_model\n"
            "from gpfq.io.data import calibration_set\n"
            "load_model('fashion_resnet'); load_model('fashion_mobilenet'); calibration_set('fashion_mnist')\n"
            "print(sorted(m for m in ('torchvision', 'torch._dynamo') if m in sys.modules))\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=python_env(), timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "[]"
