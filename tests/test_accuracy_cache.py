"""The float model's accuracy kept across runs (GPFQ_CACHE_DIR): a rerun reads what an evaluation measured, and
whatever decides it (the weights, the model's code, the threads) measures it anew; a torn file is measured again."""
import json

import pytest
import torch

from gpfq.io.data import eval_subset, evaluation_loader, evaluation_set
from gpfq.io.models import load_model

from helpers import run_script, scored

READ = "as measured on the same weights, data and settings"
TINY_MODEL = """import torch


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(784, 10)

    def forward(self, x):
        return {sign}self.fc(x.flatten(1))


def build():
    torch.manual_seed(0)
    return Tiny()
"""


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("GPFQ_CACHE_DIR", str(folder))
    return folder / "float_accuracy"


def float_top1(tmp_path, capsys, *argv) -> tuple:
    """(the row's Original Top1 Accuracy, whether the run read it from the cache) of a 200-image MSQ run."""
    [row] = run_script("quantization_scripts", "--method", "msq", "--bits", "3", "--batch_size", "16",
                       "--eval_subset", "200", "--log_dir", str(tmp_path / "logs"), "--model_dir",
                       str(tmp_path / "models"), *argv)
    return row["Original Top1 Accuracy"], READ in capsys.readouterr().out


def test_a_rerun_reads_the_measured_accuracy_and_other_weights_are_measured(tmp_path, capsys, cache):
    first = float_top1(tmp_path, capsys, "--num_threads", "1")
    again = float_top1(tmp_path, capsys, "--num_threads", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # the independent expectation: the float model evaluated directly on the same 200 images
        direct, _ = scored(load_model("fashion_resnet"),
                           evaluation_loader(eval_subset(evaluation_set("fashion_mnist"), 200)))
    finally:
        torch.set_num_threads(threads)
    assert first == (round(direct, 6), False) and again == (first[0], True)
    [kept] = cache.glob("*.json")
    assert json.loads(kept.read_text())["top1"] == direct
    random = float_top1(tmp_path, capsys, "--num_threads", "1", "--weights", "random")
    assert random[1] is False and random[0] < 0.5 and len(list(cache.glob("*.json"))) == 2


def test_edited_code_other_threads_and_a_torn_file_are_measured_again(tmp_path, capsys, cache, monkeypatch):
    factory = tmp_path / "tiny_model.py"
    factory.write_text(TINY_MODEL.format(sign=""))
    model = ["--model", f"{factory}:build", "--num_threads", "1"]
    measured = float_top1(tmp_path, capsys, *model)
    assert measured[1] is False and float_top1(tmp_path, capsys, *model) == (measured[0], True)
    # the same module and class names and the same weights, another forward (a file of the same name elsewhere:
    # a process imports a model file once, a user's next run is a new process)
    edited = tmp_path / "edited" / "tiny_model.py"
    edited.parent.mkdir()
    edited.write_text(TINY_MODEL.format(sign="-"))
    model = ["--model", f"{edited}:build", "--num_threads", "1"]
    negated = float_top1(tmp_path, capsys, *model)
    assert negated[1] is False and negated[0] != measured[0]
    assert float_top1(tmp_path, capsys, *model[:-1], "2")[1] is False  # two threads: other float paths
    for kept in cache.glob("*.json"):
        kept.write_text('{"top1": 0.9')  # torn
    assert float_top1(tmp_path, capsys, *model) == (negated[0], False)
    assert float_top1(tmp_path, capsys, *model) == (negated[0], True)
    monkeypatch.setenv("GPFQ_CACHE_DIR", "off")
    assert float_top1(tmp_path, capsys, *model) == (negated[0], False)
