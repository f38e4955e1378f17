"""The scripts in examples/ and the README's "your own model" snippet run, and their weights are on the alphabet."""
import re
import runpy
import sys

import pytest
import torch
from torch import nn

from gpfq.methods.alphabet import layer_radius, make_alphabet
from gpfq.paths import REPO_ROOT

EXAMPLES = REPO_ROOT / "examples"


def assert_on_alphabets(analog: nn.Module, quantized: nn.Module, reports, bits: int = 4, scalar: float = 1.3):
    """Every reported layer's quantized weights lie on its gpfq2022 alphabet, C·rad·(linspace(−1, 1, 2^b) ∪ {0}),
    rad = mean over neurons of max |w| of the float layer (the default header's alphabet)."""
    assert reports
    for report in reports:
        weight = analog.get_submodule(report.name).weight.detach()
        alphabet = make_alphabet("gpfq2022", bits, scalar, layer_radius(weight.reshape(weight.shape[0], -1), 1.0))
        levels = quantized.get_submodule(report.name).weight.detach().double().reshape(-1, 1)
        distance = (levels - alphabet.reshape(1, -1)).abs().min(dim=1).values
        assert float(distance.max()) <= 1e-6 * float(alphabet.abs().max()), report.name
        assert 0.0 <= report.relative_error < 1.0, report.name
        assert not torch.equal(weight, quantized.get_submodule(report.name).weight.detach()), report.name


def run_example(name: str, argv=(), monkeypatch=None):
    monkeypatch.setattr(sys, "argv", [str(EXAMPLES / name), *argv])
    return runpy.run_path(str(EXAMPLES / name), run_name="__main__")


@pytest.mark.parametrize("name", ["quantize_tensors.py", "quantize_imagefolder.py", "my_model.py"])
def test_examples_are_short(name):
    assert len((EXAMPLES / name).read_text().splitlines()) < 30


def test_own_model_on_own_tensors(monkeypatch, capsys):
    names = run_example("quantize_tensors.py", monkeypatch=monkeypatch)
    model, result = names["model"], names["result"]
    assert [r.name for r in result.reports] == ["0", "3", "7"]  # both convolutions and the Linear, in order
    assert_on_alphabets(model, result.model, result.reports)
    printed = capsys.readouterr().out
    for report in result.reports:  # one line per layer with its relative error
        assert f"{report.name:4s} relative error {report.relative_error:.4f}" in printed
    assert re.search(r"picks the float model's class on \d+% of new inputs", printed)


@pytest.mark.slow  # ResNet-18 at 224×224 (about 35 s of CPU)
def test_torchvision_classifier_on_photo_folder(photo_folder, monkeypatch, capsys):
    names = run_example("quantize_imagefolder.py", [str(photo_folder), "--model", "resnet18", "--random"],
                        monkeypatch=monkeypatch)
    model, result = names["model"], names["result"]
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert sorted(r.name for r in result.reports) == sorted(layers) and len(layers) == 21
    assert_on_alphabets(model, result.model, result.reports)
    assert re.search(r"resnet18: 21 layers at 4 bits; the float model's class on \d/9 images",
                     capsys.readouterr().out)


def test_readme_snippet(monkeypatch, capsys):
    """The README's "your own model" code block, run as written."""
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme[readme.index("## Your own model"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len(code.strip().splitlines()) <= 12
    names = {}
    exec(compile(code, "README.md", "exec"), names)  # noqa: S102 - the documented snippet itself
    result = names["result"]
    assert_on_alphabets(names["model"], result.model, result.reports)
    printed = capsys.readouterr().out.splitlines()
    assert len(result.reports) == 2
    for report in result.reports:
        assert f"{report.name} {round(report.relative_error, 4)}" in printed
