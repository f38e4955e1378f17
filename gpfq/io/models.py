"""Models: torchvision's ImageNet classifiers by name, the small embedded defaults, and the user's own
(a factory in a module or file, or a timm model: gpfq.io.user_models).

The embedded models are torchvision's ResNet and MobileNetV2 blocks at Fashion-MNIST size; their trained
weights ship in gpfq/pretrained/ (made by scripts/train_default_models.py). The three blocks are written out
here, module for module and op for op as torchvision's (the same state-dict keys, the same bits out;
tests/test_imports.py compares them with torchvision's), because importing torchvision costs 1.5-2 s
of CPU (it imports torch._dynamo): about 40 % of a script's start, for every `--help`, every one-line
error and every run of the default model, which needs nothing else from torchvision.

Every model the scripts save loads with `load_model(name, path)`, or `load_saved_model(path)`, which
reads the name from the JSON sidecar: layers that gained a bias (bias correction, folded BatchNorm)
get one, and BatchNorm layers folded away become Identity, before the state is loaded strictly.
"""
import copy
import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from gpfq.errors import BadHyperparameterError
from gpfq.paths import PRETRAINED_DIR
from gpfq.io.user_models import WeightsUnavailableError, build_user_model, check_user_model, is_user_model, load_weights


class ConvNormActivation(nn.Sequential):
    """Conv2d (no bias, padding (k − 1) / 2) → BatchNorm2d → activation: torchvision's Conv2dNormActivation."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, groups: int = 1,
                 activation_layer=nn.ReLU):
        super().__init__(nn.Conv2d(in_channels, out_channels, kernel_size, stride, (kernel_size - 1) // 2,
                                   groups=groups, bias=False),
                         nn.BatchNorm2d(out_channels), activation_layer(inplace=True))
        self.out_channels = out_channels


class BasicBlock(nn.Module):
    """ResNet's basic block: relu(bn2(conv2(relu(bn1(conv1(x))))) + downsample(x)), torchvision's BasicBlock."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1, downsample: nn.Module = None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x if self.downsample is None else self.downsample(x)
        return self.relu(out)


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1×1 expansion (when expand_ratio ≠ 1), 3×3 depthwise, linear 1×1 projection, plus x
    when the shape allows (stride 1, in = out); torchvision's InvertedResidual."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int):
        super().__init__()
        self.stride = stride
        hidden = int(round(in_channels * expand_ratio))
        self.use_res_connect = stride == 1 and in_channels == out_channels
        layers = [ConvNormActivation(in_channels, hidden, 1, activation_layer=nn.ReLU6)] if expand_ratio != 1 else []
        layers += [ConvNormActivation(hidden, hidden, 3, stride, groups=hidden, activation_layer=nn.ReLU6),
                   nn.Conv2d(hidden, out_channels, 1, 1, 0, bias=False), nn.BatchNorm2d(out_channels)]
        self.conv = nn.Sequential(*layers)
        self.out_channels = out_channels
        self._is_cn = stride > 1

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class FashionResNet(nn.Module):
    """ResNet-8 for 1×28×28 inputs: a 3×3 stem and three stages of one BasicBlock (16, 32, 64 wide)."""

    def __init__(self, num_classes: int = 10, widths=(16, 32, 64)):
        super().__init__()
        self.stem = ConvNormActivation(1, widths[0], kernel_size=3)
        stages, in_width = [], widths[0]
        for i, width in enumerate(widths):
            stride = 1 if i == 0 else 2
            downsample = None
            if stride != 1 or in_width != width:
                downsample = nn.Sequential(nn.Conv2d(in_width, width, 1, stride=stride, bias=False),
                                           nn.BatchNorm2d(width))
            stages.append(BasicBlock(in_width, width, stride=stride, downsample=downsample))
            in_width = width
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_width, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.stages(self.stem(x))), 1))


class FashionMobileNet(nn.Module):
    """MobileNetV2-style net for 1×28×28 inputs: inverted residuals with depthwise convolutions."""

    # (expand_ratio, out_channels, stride) per InvertedResidual block; the stem halves 28×28 to 14×14
    BLOCKS = ((1, 16, 1), (4, 24, 1), (4, 24, 1), (4, 32, 2), (4, 32, 1))

    def __init__(self, num_classes: int = 10, head_width: int = 128):
        super().__init__()
        layers, in_width = [ConvNormActivation(1, 16, kernel_size=3, stride=2, activation_layer=nn.ReLU6)], 16
        for expand_ratio, width, stride in self.BLOCKS:
            layers.append(InvertedResidual(in_width, width, stride, expand_ratio))
            in_width = width
        layers.append(ConvNormActivation(in_width, head_width, kernel_size=1, activation_layer=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(head_width, num_classes)

    def forward(self, x):
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


EMBEDDED_MODELS = {"fashion_resnet": FashionResNet, "fashion_mobilenet": FashionMobileNet}
EMBEDDED_DATASET = "fashion_mnist"


def is_embedded(name: str) -> bool:
    return name in EMBEDDED_MODELS


def embedded_record(name: str) -> dict:
    """The training record (command, seed, accuracy) saved beside an embedded model's weights."""
    path = PRETRAINED_DIR / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def torchvision_names() -> list:
    from torchvision import models
    return sorted(models.list_models(module=models))


def check_model_name(name: str) -> None:
    """Raise ValueError for a name that is neither embedded, a torchvision classifier, nor a user model."""
    if not isinstance(name, str):
        raise BadHyperparameterError(f"bad hyperparameter: model name must be a string, got {name!r}")
    if is_embedded(name):
        return
    if is_user_model(name):
        check_user_model(name)
        return
    names = torchvision_names()
    if name not in names:
        raise BadHyperparameterError(f"unknown model {name!r}: use one of the embedded models "
                                     f"{sorted(EMBEDDED_MODELS)}, a torchvision classifier "
                                     f"({', '.join(names[:8])}, …), 'package.module:factory', "
                                     f"'path/to/file.py:factory' or 'timm:<name>'")


def is_torchvision(name) -> bool:
    return isinstance(name, str) and not is_embedded(name) and not is_user_model(name)


def _torchvision_weights(name: str):
    from torchvision import models
    return models.get_model_weights(name).DEFAULT


def weights_cache_path(name: str) -> Path:
    """Where torch.hub keeps the downloaded ImageNet weights of a torchvision model."""
    url = _torchvision_weights(name).url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def published_accuracy(name: str):
    """torchvision's published ImageNet (top-1, top-5) as fractions, or None if it has none."""
    if not is_torchvision(name):
        return None
    try:
        metrics = _torchvision_weights(name).meta["_metrics"]["ImageNet-1K"]
    except (ValueError, KeyError, AttributeError):
        return None
    return metrics["acc@1"] / 100.0, metrics["acc@5"] / 100.0


def load_model(name: str, weights: str = "DEFAULT", seed: int = 0) -> nn.Module:
    """Build model `name` in eval mode.

    weights: 'DEFAULT' (the embedded model's shipped weights, or torchvision's ImageNet weights,
    downloaded into the torch.hub cache when missing), 'random' (untrained, initialised from `seed`: the
    same seed gives the same network, and torch's global random state is left as it was), or the path of
    a local state-dict file. User models (factories, timm): gpfq.io.user_models.build_user_model.
    """
    check_model_name(name)
    if weights == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return _load_model(name, weights)
    return _load_model(name, weights)


def _load_model(name: str, weights: str) -> nn.Module:
    if is_user_model(name):
        return build_user_model(name, weights)
    if is_embedded(name):
        model = EMBEDDED_MODELS[name]()
        if weights == "DEFAULT":
            weights = PRETRAINED_DIR / f"{name}.pt"
    elif weights == "random":
        from torchvision import models
        model = models.get_model(name, weights=None)
    else:
        from torchvision import models
        model = models.get_model(name, weights=None, **_architecture_kwargs(name))
        if weights == "DEFAULT":
            model.load_state_dict(_download_torchvision_weights(name))
            return model.eval()
    if weights != "random":
        load_weights(model, weights, name)
    return model.eval()


def load_saved_model(path, architecture: nn.Module = None) -> nn.Module:
    """A model the scripts saved (`models/<model>/….pt`), in eval mode: a copy of `architecture` with the saved
    state dict (layers that gained a bias through bias correction get a zero bias first), or without one built
    from the model name in its JSON sidecar."""
    path = Path(path)
    if architecture is not None:
        return load_weights(copy.deepcopy(architecture), path, None).eval()
    sidecar = path.with_suffix(".json")
    if not sidecar.exists():
        raise WeightsUnavailableError(f"{sidecar} not found: load a saved model without its sidecar with "
                                      f"load_model(name, {str(path)!r})")
    hyperparameters = json.loads(sidecar.read_text()).get("hyperparameters", {})
    return load_model(hyperparameters["model_name"], str(path))


_SHA256_CACHE = {}


def file_sha256(path) -> str:
    """The sha256 hex digest of a file (cached per path, size and modification time)."""
    path = Path(path).resolve()
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA256_CACHE:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _SHA256_CACHE[key] = digest.hexdigest()
    return _SHA256_CACHE[key]


def weights_label(name: str, weights) -> str:
    """How a log row names a model's weights: 'random'; a file as its name and the first 12 hex digits of
    its sha256 (the embedded models' shipped 'DEFAULT' file included, so retrained weights differ);
    torchvision's 'DEFAULT' with the name of its weights file (which carries a hash prefix)."""
    if weights == "random":
        return "random"
    if weights == "DEFAULT" and not is_embedded(name):
        try:
            return f"DEFAULT {os.path.basename(_torchvision_weights(name).url)}"
        except (ValueError, KeyError, AttributeError):  # a model with no torchvision weights of that name
            return "DEFAULT"
    path = PRETRAINED_DIR / f"{name}.pt" if weights == "DEFAULT" else Path(weights)
    label = "DEFAULT" if weights == "DEFAULT" else path.name
    return f"{label} sha256:{file_sha256(path)[:12]}" if path.exists() else label


def _architecture_kwargs(name: str) -> dict:
    # torchvision builds these differently when pretrained weights are loaded.
    if name == "googlenet":
        return {"aux_logits": False, "transform_input": True, "init_weights": False}
    if name == "inception_v3":
        return {"aux_logits": True, "transform_input": True, "init_weights": False}
    return {}


def _download_torchvision_weights(name: str) -> dict:
    weights = _torchvision_weights(name)
    cache = weights_cache_path(name)
    try:
        return weights.get_state_dict(progress=True, check_hash=False)
    except Exception as error:
        raise WeightsUnavailableError(
            f"ImageNet weights for {name!r} are not cached at {cache} and could not be downloaded "
            f"({type(error).__name__}: {error}). Copy the file there from {weights.url}, or set "
            f"weights = '/path/to/state_dict.pth' (a local weights file).") from error
