"""Models named by the user: a factory in a module or a file, or a timm model.

Model names understood here (the rest, embedded and torchvision names, are gpfq.io.models'):
  'package.module:factory'   factory() from an importable module
  'path/to/file.py:factory'  factory() from a Python file (relative to the working folder, else the repo root)
  'timm:<name>'              timm.create_model(<name>) (timm is an optional dependency)

A factory takes no arguments and returns an nn.Module; the model defines its own number of
classes and input size. It may declare its preprocessing (see gpfq.runner.preprocessing):
`preprocess` (a callable PIL image -> tensor), or `input_size = (C, H, W)` with optional `mean`, `std`.

Weights: 'DEFAULT' (the factory's model as built; timm's pretrained weights), 'random'
(the factory's model as built; timm without pretrained weights), or the path of a local
state-dict file (.pt/.pth, or .safetensors).
"""
import importlib
import importlib.util
import os
import re
import socket
import sys
import warnings
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from gpfq.errors import BadInputError
from gpfq.paths import REPO_ROOT
from gpfq.io.state_dicts import StateDictMismatchError, load_state

TIMM_PREFIX = "timm:"


class WeightsUnavailableError(BadInputError, FileNotFoundError):
    """Pretrained weights could neither be found locally nor downloaded."""


class ModelSpecError(BadInputError, ValueError):
    """A user model name that cannot be resolved to a model factory."""


def is_user_model(name) -> bool:
    """A factory ('module:factory', 'file.py:factory') or timm name, rather than an embedded/torchvision one."""
    return isinstance(name, str) and ":" in name


def is_timm(name) -> bool:
    return isinstance(name, str) and name.startswith(TIMM_PREFIX)


def _split(name: str):
    """(source, factory name) of 'source:factory'; a Windows drive letter stays in the source."""
    source, _, factory = name.rpartition(":")
    if not source or not factory:
        raise ModelSpecError(f"model {name!r}: write 'package.module:factory', 'path/to/file.py:factory' or "
                             f"'timm:<name>'")
    return source, factory


def _model_file(source: str) -> Path:
    """The factory's file: relative to the working folder, else to the repository root."""
    path = Path(source).expanduser()
    candidates = [path] if path.is_absolute() else list(dict.fromkeys([Path.cwd() / path, REPO_ROOT / path]))
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise ModelSpecError(f"model file {source!r} not found (looked at {' and '.join(map(str, candidates))})")


_MODULES = {}


def _import_source(source: str):
    """The module holding the factory (each file or module imported once per process)."""
    if source in _MODULES:
        return _MODULES[source]
    if source.endswith(".py"):
        path = _model_file(source)
        module_name = "gpfq_user_model_" + re.sub(r"\W", "_", path.stem)
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # so that pickling, dataclasses and the like find it
        try:
            spec.loader.exec_module(module)
        except Exception as error:
            del sys.modules[module_name]
            raise ModelSpecError(f"model file {path} could not be run ({type(error).__name__}: {error})") from error
    else:
        try:
            module = importlib.import_module(source)
        except ImportError as error:
            raise ModelSpecError(f"model module {source!r} cannot be imported ({type(error).__name__}: {error}); "
                                 f"give an importable module (on PYTHONPATH) or a file path ending in .py") from error
        except Exception as error:
            raise ModelSpecError(f"model module {source!r} could not be imported ({type(error).__name__}: "
                                 f"{error})") from error
    _MODULES[source] = module
    return module


def _factory(name: str):
    source, factory_name = _split(name)
    module = _import_source(source)
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        public = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_")
                        and getattr(v, "__module__", None) == module.__name__)
        raise ModelSpecError(f"model {name!r}: {source} has no factory {factory_name!r}"
                             f"{' (it defines ' + ', '.join(public) + ')' if public else ''}")
    return factory


def _timm():
    try:
        import timm
    except ImportError as error:
        raise ModelSpecError("timm models need the timm package: pip install timm") from error
    return timm


def check_user_model(name: str) -> None:
    """ModelSpecError for a factory or timm name that cannot be resolved (cheap: nothing is built)."""
    if is_timm(name):
        timm_name = name[len(TIMM_PREFIX):]
        timm = _timm()
        if not timm.is_model(timm_name):
            close = timm.list_models(f"*{timm_name[:4]}*")[:8] if len(timm_name) >= 4 else []
            raise ModelSpecError(f"timm has no model {timm_name!r}"
                                 f"{' (similar: ' + ', '.join(close) + ')' if close else ''}")
        return
    _factory(name)


def model_folder(name: str) -> str:
    """A file-system-safe folder name for a model's saved results ('examples/my_model.py:build' -> 'my_model.build')."""
    if not is_user_model(name):
        return name
    if is_timm(name):
        return "timm_" + re.sub(r"[^\w.-]", "_", name[len(TIMM_PREFIX):])
    source, factory = _split(name)
    stem = Path(source).stem if source.endswith(".py") else source
    return re.sub(r"[^\w.-]", "_", f"{stem}.{factory}")


EXPECTED_STATE = ("expected a state dict: a dict of tensors saved with torch.save(model.state_dict(), path), "
                  "or a .safetensors file")


class NotAStateDictError(BadInputError, ValueError):
    """A weights file that holds something other than a state dict (a text file, a whole model, a list…)."""


def _file_kind(path: Path) -> str:
    """What a file that torch.load refused looks like, from its first bytes."""
    with open(path, "rb") as f:
        start = f.read(256)
    if not start:
        return "an empty file"
    if start.startswith(b"PK\x03\x04") or start.startswith(b"\x80"):  # torch's zip archive, a bare pickle
        # weights_only refuses every object but tensors and plain containers: a whole model, an optimizer…
        return "a pickle of Python objects other than tensors (e.g. a whole model saved with torch.save(model))"
    try:
        text = start.decode("utf-8")
    except UnicodeDecodeError:
        return "a binary file in neither torch's format nor safetensors'"
    preview = text.strip().splitlines()[0][:40] if text.strip() else ""
    return f"a text file (it starts {preview!r})"


def _not_a_state_dict(state) -> str:
    """Why a loaded object is not a state dict ('' when it is one)."""
    if not isinstance(state, dict):
        return f"a pickled {type(state).__name__}"
    others = [str(key) for key, value in state.items() if not isinstance(value, torch.Tensor)]
    if not others:
        return ""
    nested = [str(key) for key, value in state.items()
              if isinstance(value, dict) and value and all(isinstance(v, torch.Tensor) for v in value.values())]
    hint = f" its entry {nested[0]!r} may be the state dict" if nested else ""
    return (f"a dict whose entries {', '.join(repr(k) for k in others[:4])}{', …' if len(others) > 4 else ''} "
            f"are not tensors (a training checkpoint?{hint})")


def load_state_dict_file(path) -> dict:
    """A local state dict (.pt/.pth via torch.load, or .safetensors); a file that is none is NotAStateDictError,
    saying what the file is."""
    path = Path(path)
    if not path.is_file():
        raise WeightsUnavailableError(f"weights file {path} not found; weights is 'DEFAULT', 'random' or the "
                                      f"path of a state-dict file")
    if path.suffix == ".safetensors":
        try:
            from safetensors import SafetensorError
            from safetensors.torch import load_file
        except ImportError as error:
            raise WeightsUnavailableError(f"weights file {path}: reading .safetensors needs the safetensors "
                                          f"package (pip install safetensors)") from error
        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as error:
            raise NotAStateDictError(f"weights file {path} is not a readable safetensors file "
                                     f"({type(error).__name__}: {error}); {EXPECTED_STATE}") from error
        if any(key.endswith("#codes") for key in state):  # gpfq.io.model_file's codes: not a float state dict
            raise NotAStateDictError(f"weights file {path} is a quantized model file (integer codes and codebooks); "
                                     f"pass the .pt saved beside it (same stem), or load it with "
                                     f"gpfq.load_quantized(path)")
        return state
    try:
        with warnings.catch_warnings():  # torch warns about a bare pickle's protocol before refusing it
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except MemoryError:
        raise
    except Exception as error:  # torch's own text advises weights_only=False: never for a user's file
        raise NotAStateDictError(f"weights file {path} is {_file_kind(path)}; {EXPECTED_STATE}") from error
    what = _not_a_state_dict(state)
    if what:
        raise NotAStateDictError(f"weights file {path} is {what}; {EXPECTED_STATE}")
    return state


def load_weights(model: nn.Module, path, name: str) -> nn.Module:
    """Load a local state dict into `model`; a mismatch is one clear error naming the keys."""
    state = load_state_dict_file(path)
    try:  # a saved quantized model may have gained biases or folded its BatchNorm: load_state fits the model
        return load_state(model, state, f"weights file {path}", name)
    except StateDictMismatchError as error:  # raised as before, as weights that are not there for this model
        raise WeightsUnavailableError(str(error)) from None


def build_user_model(name: str, weights="DEFAULT") -> nn.Module:
    """The model of a factory or timm name, in eval mode (see the module docstring for `weights`)."""
    check_user_model(name)
    local = weights not in ("DEFAULT", "random")
    if is_timm(name):
        model = _timm_model(name[len(TIMM_PREFIX):], pretrained=weights == "DEFAULT")
    else:
        factory = _factory(name)
        try:
            model = factory()
        except Exception as error:  # the user's code: its error, in one line, is the report
            text = str(error).strip().splitlines()
            raise ModelSpecError(f"model {name!r}: the factory {getattr(factory, '__name__', name)}() raised "
                                 f"{type(error).__name__}" + (f": {text[0]}" if text else "")) from error
        if not isinstance(model, nn.Module):
            raise ModelSpecError(f"model {name!r}: the factory returned {type(model).__name__}, not a torch.nn.Module")
    if local:
        load_weights(model, weights, name)
    return model.eval()


# ---------------------------------------------------------------- timm's pretrained weights
def _hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def reachable(url: str, timeout: float = 5.0) -> bool:
    """Whether a TCP connection to the URL's host opens within `timeout` seconds. A seam: looked up on this
    module at each call, so a test replaces it (monkeypatch.setattr) to play a machine without network."""
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname, parsed.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def cached_timm_file(hub_id: str):
    """The cached weights file of a Hugging Face repo id, or None. A seam like `reachable`: a test replaces it
    to play a machine whose cache is empty."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for filename in ("model.safetensors", "pytorch_model.bin"):
        path = try_to_load_from_cache(hub_id, filename)
        if isinstance(path, str):
            return path
    return None


def _timm_model(timm_name: str, pretrained: bool) -> nn.Module:
    timm = _timm()
    model = timm.create_model(timm_name, pretrained=False)
    if not pretrained:
        return model
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    hub_id = cfg.get("hf_hub_id")
    if not hub_id and not cfg.get("url"):
        raise WeightsUnavailableError(f"timm has no pretrained weights for {timm_name!r}; use --weights random or "
                                      f"--weights /path/to/state_dict.pth")
    cached = cached_timm_file(hub_id) if hub_id else None
    if cached:
        return timm.create_model(timm_name, pretrained=True, pretrained_cfg_overlay={"file": cached})
    endpoint = _hub_endpoint() if hub_id else cfg["url"]
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    if offline or not reachable(endpoint):
        raise WeightsUnavailableError(
            f"timm's pretrained weights for {timm_name!r} are not cached and {urlparse(endpoint).hostname} cannot "
            f"be reached{' (HF_HUB_OFFLINE is set)' if offline else ''}: download them once with network access, "
            f"or pass --weights /path/to/state_dict.pth (a local file) or --weights random")
    try:
        return timm.create_model(timm_name, pretrained=True)
    except Exception as error:
        raise WeightsUnavailableError(f"timm's pretrained weights for {timm_name!r} could not be downloaded "
                                      f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); "
                                      f"pass --weights /path/to/state_dict.pth or --weights random") from error
