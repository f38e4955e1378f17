"""Your own model (module:factory, file.py:factory, timm:<name>) and your own images (--dataset imagefolder)."""
import sys
from pathlib import Path

import pytest
import timm  # noqa: F401  (the dev extra installs it: without it these tests fail, they are not skipped)
import torch
from torch import nn

from conftest import python_env, script_header, write_photo_folder
from helpers import logged_rows as read_rows
from helpers import (check_model_fits_data, check_model_takes_images, grid_points, image_folder_data,
                     logged_float_accuracy, model_data_mismatch_error, model_preprocessing, refuse_evaluation,
                     refuse_model_loading, run_python, run_script, small_evaluation)
from gpfq.io import user_models
from gpfq.io.data import DataMissingError, image_folder_classes
from gpfq.io.models import WeightsUnavailableError, load_model
from gpfq.paths import REPO_ROOT
from gpfq.io.user_models import ModelSpecError, model_folder

HEADER = script_header("quantization_scripts")
MY_MODEL = "examples/my_model.py:build"
ModelDataMismatchError = model_data_mismatch_error()

MODEL_FILE = '''
import torch
from torch import nn

class Net(nn.Module):
    """Takes exactly C×S×S images (a Linear on the flattened image), NUM_CLASSES outputs."""
    def __init__(self, channels, size, classes):
        super().__init__()
        self.conv = nn.Conv2d(channels, 4, 3, padding=1)
        self.fc = nn.Linear(4 * size * size, classes)
    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))

def rgb16():
    net = Net(3, 16, 3)
    net.input_size = (3, 16, 16)
    return net

def gray16():
    net = Net(1, 16, 3)
    net.input_size = (1, 16, 16)
    return net

def undeclared():  # no input_size: the default 224×224 preprocessing, which this model cannot take
    return Net(3, 16, 3)

def two_classes():
    net = Net(3, 16, 2)
    net.input_size = (3, 16, 16)
    return net

def fashion():  # 1×28×28, 10 classes: fits Fashion-MNIST
    return Net(1, 28, 10)

def not_a_model():
    return 42
'''


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "nets.py"
    path.write_text(MODEL_FILE)
    return path


def run_main(argv, tmp_path):
    return run_script(HEADER, *argv, "--log_dir", str(tmp_path / "logs"), "--model_dir", str(tmp_path / "models"))


@pytest.fixture
def no_evaluation(monkeypatch):
    """Fail the test if evaluation (the first expensive work) starts."""
    refuse_evaluation(monkeypatch)


# ---------------------------------------------------------------- user models
def test_file_factory_builds_and_loads_local_weights(model_file, tmp_path):
    name = f"{model_file}:rgb16"
    model = load_model(name, "random")
    assert isinstance(model, nn.Module) and not model.training
    again = load_model(name)
    assert model.fc.weight.shape == again.fc.weight.shape == (3, 4 * 16 * 16)
    state = {k: torch.full_like(v, 0.5) for k, v in model.state_dict().items()}
    torch.save(state, tmp_path / "weights.pt")
    loaded = load_model(name, str(tmp_path / "weights.pt"))
    assert torch.equal(loaded.conv.weight, torch.full_like(loaded.conv.weight, 0.5))
    assert model_folder(name) == "nets.rgb16"


def test_module_factory(model_file, monkeypatch):
    monkeypatch.syspath_prepend(str(model_file.parent))
    model = load_model("nets:gray16")
    assert model.conv.in_channels == 1
    assert model_folder("nets:gray16") == "nets.gray16"


def test_repo_relative_file_from_any_folder(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # examples/my_model.py is found relative to the repository root
    model = load_model(MY_MODEL)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("suffix, message", [
    ("nowhere.py:build", "model file 'nowhere.py' not found"),
    ("{file}:missing", "has no factory 'missing' (it defines"),
    ("{file}:not_a_model", "the factory returned int, not a torch.nn.Module"),
    ("no_such_package.models:build", "model module 'no_such_package.models' cannot be imported"),
    (":build", "write 'package.module:factory'"),
])
def test_bad_factory_is_one_clear_error(model_file, suffix, message):
    with pytest.raises(ModelSpecError, match=message.replace("(", r"\(")):
        load_model(suffix.format(file=model_file), "random")


def test_file_that_fails_to_run(tmp_path):
    (tmp_path / "broken.py").write_text("import torch\nraise RuntimeError('no GPU here')\n")
    with pytest.raises(ModelSpecError, match=r"could not be run \(RuntimeError: no GPU here\)"):
        load_model(f"{tmp_path / 'broken.py'}:build")


def test_weights_that_do_not_fit(model_file, tmp_path):
    torch.save({"fc.weight": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(WeightsUnavailableError, match="does not fit model"):
        load_model(f"{model_file}:rgb16", str(tmp_path / "other.pt"))
    with pytest.raises(WeightsUnavailableError, match="not found"):
        load_model(f"{model_file}:rgb16", str(tmp_path / "missing.pt"))


def test_bad_factory_stops_the_script_before_loading(model_file, tmp_path, no_evaluation):
    with pytest.raises(ModelSpecError, match="has no factory 'biuld'"):
        run_main(["--model", f"{model_file}:biuld", "--dataset", "imagefolder", "--data_dir", str(tmp_path)],
                 tmp_path)
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())


# ---------------------------------------------------------------- timm (the optional extra, tested)
def test_timm_model_random_and_local_weights(tmp_path):
    model = load_model("timm:resnet18", "random")
    assert model.fc.out_features == 1000
    torch.save({k: torch.zeros_like(v) for k, v in model.state_dict().items()}, tmp_path / "w.pt")
    loaded = load_model("timm:resnet18", str(tmp_path / "w.pt"))
    assert not loaded.fc.weight.any()
    transform, description = model_preprocessing("timm:resnet18", model)
    assert "timm's data config" in description
    from PIL import Image
    assert transform(Image.new("RGB", (300, 260))).shape == (3, 224, 224)  # resnet18's input_size
    assert model_preprocessing("timm:resnet18", model, image_size=64)[0](Image.new("RGB", (300, 260))).shape == \
        (3, 64, 64)
    assert model_folder("timm:resnet18") == "timm_resnet18"


def test_timm_unknown_name():
    with pytest.raises(ModelSpecError, match="timm has no model 'resnet_nineteen'"):
        load_model("timm:resnet_nineteen", "random")


@pytest.mark.parametrize("how", ["unreachable", "HF_HUB_OFFLINE"])
def test_timm_pretrained_offline_is_one_line(monkeypatch, tmp_path, how):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # nothing cached
    monkeypatch.setattr(user_models, "cached_timm_file", lambda hub_id: None)
    if how == "unreachable":
        monkeypatch.setattr(user_models, "reachable", lambda url, timeout=5.0: False)
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsUnavailableError) as error:
        load_model("timm:resnet18")
    message = str(error.value)
    assert "\n" not in message and "'resnet18'" in message and "--weights /path/to/state_dict.pth" in message
    assert "cannot be reached" in message


# ---------------------------------------------------------------- image folders
def test_image_folder_layout_errors(tmp_path):
    with pytest.raises(DataMissingError, match="does not exist"):
        image_folder_classes(tmp_path / "nothing")
    (tmp_path / "val").mkdir()
    with pytest.raises(DataMissingError, match="has no train/ folder"):
        image_folder_classes(tmp_path)
    (tmp_path / "train").mkdir()
    with pytest.raises(DataMissingError, match="has no class folders"):
        image_folder_classes(tmp_path)
    (tmp_path / "train" / "cats").mkdir()
    (tmp_path / "train" / "cats" / "notes.txt").write_text("not an image")
    with pytest.raises(DataMissingError, match="without images: cats"):
        image_folder_classes(tmp_path)
    (tmp_path / "train" / "cats" / "notes.txt").unlink()
    (tmp_path / "train" / "cats").rmdir()
    write_photo_folder(tmp_path, 1, 1)
    assert image_folder_classes(tmp_path) == ["astronaut", "chelsea", "coffee"]
    (tmp_path / "val" / "dogs").mkdir()
    with pytest.raises(DataMissingError, match="has classes that .* lacks: dogs"):
        image_folder_classes(tmp_path)


@pytest.mark.parametrize("layout, message", [
    ("missing", "does not exist"), ("no_train", "has no train/ folder"), ("no_val", "has no val/ folder"),
    ("no_classes", "has no class folders")])
def test_bad_folder_stops_the_script_before_loading(model_file, tmp_path, no_evaluation, monkeypatch, layout,
                                                    message):
    root = tmp_path / "images"
    if layout != "missing":
        for split in {"no_train": ["val"], "no_val": ["train"], "no_classes": ["train", "val"]}[layout]:
            (root / split).mkdir(parents=True)
    refuse_model_loading(monkeypatch)
    with pytest.raises(DataMissingError, match=message):
        run_main(["--model", f"{model_file}:rgb16", "--dataset", "imagefolder", "--data_dir", str(root)], tmp_path)


def test_photos_are_prepared_as_each_model_declares(photo_folder, model_file):
    cases = [(f"{model_file}:rgb16", None, (3, 16, 16)), (f"{model_file}:gray16", None, (1, 16, 16)),
             (f"{model_file}:undeclared", None, (3, 224, 224)), (f"{model_file}:undeclared", 40, (3, 40, 40)),
             ("fashion_resnet", None, (1, 28, 28)), ("resnet18", None, (3, 224, 224)), ("resnet18", 64, (3, 64, 64))]
    for name, size, shape in cases:
        model = load_model(name, "random")
        train, val = image_folder_data(name, model, photo_folder, size, log=lambda *_: None)
        assert (len(train), len(val)) == (18, 9) and train.classes == ["astronaut", "chelsea", "coffee"]
        image, label = val[8]
        assert tuple(image.shape) == shape and label == 2, name
    from torchvision.models import ResNet18_Weights
    expected = ResNet18_Weights.DEFAULT.transforms()
    from PIL import Image
    photo = Image.open(Path(photo_folder) / "val" / "coffee" / "0.jpg").convert("RGB")
    transform, _ = model_preprocessing("resnet18", load_model("resnet18", "random"))
    assert torch.equal(transform(photo), expected(photo))  # torchvision's own preprocessing, bit for bit


@pytest.mark.parametrize("factory, size, error", [
    ("undeclared", None, "cannot take the imagefolder images: one image is 3×224×224"),
    ("rgb16", 24, "cannot take the imagefolder images: one image is 3×24×24"),
    ("two_classes", None, "has 2 outputs but dataset imagefolder has 3 classes"),
])
def test_model_that_does_not_fit_the_images(model_file, photo_folder, tmp_path, no_evaluation, factory, size, error):
    argv = ["--model", f"{model_file}:{factory}", "--dataset", "imagefolder", "--data_dir", str(photo_folder),
            "--batch_size", "4"] + (["--image_size", str(size)] if size else [])
    with pytest.raises(ModelDataMismatchError, match=error):
        run_main(argv, tmp_path)


def test_wrong_channels_on_fashion_mnist(model_file):
    from gpfq.io.data import calibration_set
    model = load_model(f"{model_file}:rgb16")
    with pytest.raises(ModelDataMismatchError, match="one image is 1×28×28 and the model raised RuntimeError"):
        check_model_takes_images("rgb16", model, "fashion_mnist", calibration_set("fashion_mnist"))


@pytest.mark.parametrize("model, dataset, size, fits", [
    ("fashion_resnet", "fashion_mnist", None, True), ("resnet18", "imagenet", None, True),
    ("resnet18", "fashion_mnist", None, "it takes 3-channel images"),
    ("fashion_resnet", "imagenet", None, "the embedded models take 1×28×28"),
    ("fashion_resnet", "imagefolder", None, True), ("resnet18", "imagefolder", 64, True),
    ("{file}:fashion", "fashion_mnist", None, True), ("{file}:rgb16", "imagenet", None, True),
    ("resnet18", "imagenet", 64, "image_size applies to --dataset imagefolder only"),
    ("resnet18", "imagefolder", 4, "image_size must be None"),
])
def test_which_model_goes_with_which_data(model_file, photo_folder, model, dataset, size, fits):
    check = lambda: check_model_fits_data(model.format(file=model_file), dataset, size, photo_folder)  # noqa: E731
    if fits is True:
        check()
    else:
        with pytest.raises(ValueError, match=fits):
            check()


@pytest.mark.slow
def test_user_model_on_fashion_mnist_end_to_end(model_file, tmp_path, monkeypatch):
    small_evaluation(monkeypatch, 64)
    rows = run_main(["--model", f"{model_file}:fashion", "--dataset", "fashion_mnist", "--batch_size", "8"], tmp_path)
    assert rows[0]["Dataset"] == "fashion_mnist" and rows[0]["Model Name"] == f"{model_file}:fashion"
    assert len(list((tmp_path / "models" / "nets.fashion").glob("*.pt"))) == 1


@pytest.mark.slow
def test_my_model_script_end_to_end(photo_folder, tmp_path):
    """The documented command: the example factory on an ImageFolder, from the repo root, logs a row."""
    command = [sys.executable, "quantization_scripts/quantize.py", "--model", MY_MODEL, "--dataset", "imagefolder",
               "--data_dir", str(photo_folder), "--batch_size", "8", "--log_dir", str(tmp_path / "logs"),
               "--model_dir", str(tmp_path / "models")]
    done = run_python(command, cwd=REPO_ROOT, env=python_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "images prepared with the model's input_size (3, 32, 32)" in done.stdout + done.stderr
    rows = read_rows(tmp_path / "logs" / "Quantization_Log.csv")
    assert len(rows) == 1
    row = rows[0]
    assert row["Model Name"] == MY_MODEL and row["Dataset"] == f"imagefolder:{photo_folder.resolve()}"
    for key in ("Original Top1 Accuracy", "Quantized Top1 Accuracy"):  # k of the 9 val images
        assert float(row[key]) * 9 == pytest.approx(round(float(row[key]) * 9), abs=1e-4)
    saved = list((tmp_path / "models" / "my_model.build").glob("*.pt"))
    assert len(saved) == 1
    quantized, analog = load_model(MY_MODEL, str(saved[0])), load_model(MY_MODEL)
    for name in ("features.0", "features.4", "classifier.1", "classifier.3"):
        levels = torch.unique(quantized.get_submodule(name).weight)
        assert len(levels) <= 17, name  # on a 4-bit alphabet (2^4 + 1 levels)
        assert not torch.equal(quantized.get_submodule(name).weight, analog.get_submodule(name).weight)
    import gpfq  # the compact file beside the .pt rebuilds the user model through its factory, bit for bit
    packed = gpfq.load_quantized(saved[0].with_suffix(".safetensors")).state_dict()
    assert packed.keys() == quantized.state_dict().keys()
    assert all(torch.equal(packed[k], v) for k, v in quantized.state_dict().items())


@pytest.mark.slow
def test_timm_model_on_photo_folder_end_to_end(photo_folder, tmp_path):
    rows = run_main(["--model", "timm:resnet18", "--weights", "random", "--dataset", "imagefolder", "--data_dir",
                     str(photo_folder), "--image_size", "64", "--batch_size", "4"], tmp_path)
    assert rows[0]["Dataset"] == f"imagefolder:{photo_folder.resolve()}@64"
    saved = list((tmp_path / "models" / "timm_resnet18").glob("*.pt"))
    assert len(saved) == 1
    record = (saved[0].with_suffix(".json")).read_text()
    assert record.count('"relative_error"') == 21  # every Conv2d and Linear of timm's resnet18


def test_published_accuracy_only_on_imagenet(monkeypatch):
    """torchvision's published ImageNet accuracy stands for its own weights on ImageNet only; on an image folder
    the float model is measured."""
    # run settings changed beside the parsed point: an image folder the parse would look for is not needed here
    point = grid_points(HEADER, "--model", "resnet18", "--dataset", "imagenet")[0]
    measured = lambda **changes: logged_float_accuracy(point, (0.25, 0.5), **changes)  # noqa: E731
    assert measured() == (0.69758, 0.89078)  # torchvision's published top-1/top-5 of IMAGENET1K_V1
    assert measured(dataset="imagefolder") == (0.25, 0.5)
    assert measured(weights="random") == (0.25, 0.5)
