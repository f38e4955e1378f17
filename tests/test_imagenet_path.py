"""The ImageNet path end to end on a tiny ILSVRC2012-layout folder the test writes."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from gpfq.io.data import DataMissingError, evaluation_set
from gpfq.io.models import WeightsUnavailableError, load_model

from helpers import logged_rows, run_script

WNIDS = ["n01440764", "n01443537", "n01484850"]
HEADER = dict(model_name="resnet18", dataset="imagenet", weights="random", method="gpfq", bits=4, batch_size=4,
              mlp_scalar=1.16, cnn_scalar=1.16, mlp_percentile=1.0, cnn_percentile=1.0, alphabet="gpfq2022",
              include_0=True, retain_rate=0.25, patch_stride="kernel", ignore_layers=[], seed=0, author="test",
              num_workers=0, device="cpu", log_dir=None, model_dir=None, data_dir=None)


def _jpeg(path, seed):
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (260, 300, 3), dtype=np.uint8)).save(path, "JPEG")


def _imagenet(root, flat_val):
    for c, wnid in enumerate(WNIDS):
        for i in range(3):
            _jpeg(root / "train" / wnid / f"{wnid}_{i}.JPEG", 100 * c + i)
    val_wnids = [WNIDS[k % 3] for k in range(6)]
    for k, wnid in enumerate(val_wnids):
        name = f"ILSVRC2012_val_{k + 1:08d}.JPEG"
        _jpeg(root / "val" / (name if flat_val else f"{wnid}/{name}"), 1000 + k)
    if flat_val:  # the labels torchvision's devkit parser writes (meta.bin)
        torch.save(({w: (w,) for w in WNIDS}, val_wnids), root / "meta.bin")
    return val_wnids


@pytest.mark.parametrize("flat_val", [False, True])
def test_both_val_layouts_load_with_labels(tmp_path, flat_val):
    val_wnids = _imagenet(tmp_path / "data" / "ILSVRC2012", flat_val)
    validation = evaluation_set("imagenet", tmp_path / "data")
    labels = sorted((s[0].split("/")[-1], s[1]) for s in validation.samples)
    assert [label for _, label in labels] == [WNIDS.index(w) for w in val_wnids]
    image, _ = validation[0]
    assert image.shape == (3, 224, 224)


@pytest.mark.slow
def test_imagenet_end_to_end(tmp_path):
    _imagenet(tmp_path / "data" / "ILSVRC2012", flat_val=True)
    rows = run_script(HEADER, "--data_dir", str(tmp_path / "data"), "--log_dir", str(tmp_path / "logs"),
                      "--model_dir", str(tmp_path / "models"))
    logged = logged_rows(tmp_path / "logs" / "Quantization_Log.csv")
    assert len(rows) == len(logged) == 1
    assert logged[0]["Dataset"] == "imagenet" and logged[0]["Model Name"] == "resnet18"
    for key in ("Original Top1 Accuracy", "Quantized Top1 Accuracy", "Quantized Top5 Accuracy"):
        assert float(logged[0][key]) * 6 == pytest.approx(round(float(logged[0][key]) * 6))  # k of 6 images
    saved = list((tmp_path / "models" / "resnet18").glob("*.pt"))
    assert len(saved) == 1 and saved[0].with_suffix(".json").exists()
    record = json.loads(saved[0].with_suffix(".json").read_text())
    assert len(record["layers"]) == 21  # every Conv2d and Linear of resnet18
    quantized = load_model("resnet18", str(saved[0]))
    assert not torch.equal(quantized.conv1.weight, load_model("resnet18", "random").conv1.weight)


def test_missing_imagenet_is_one_clear_error(tmp_path):
    with pytest.raises(DataMissingError, match="data/README.md"):
        run_script(HEADER, "--data_dir", str(tmp_path), "--log_dir", str(tmp_path / "logs"),
                   "--model_dir", str(tmp_path / "models"))
    assert not (tmp_path / "models" / "resnet18").exists()


def test_offline_weights_error_names_cache_and_local_option(tmp_path):
    hub = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path))
    try:
        with pytest.raises(WeightsUnavailableError) as error:
            load_model("resnet18", "DEFAULT")
    finally:
        torch.hub.set_dir(hub)
    assert str(tmp_path / "checkpoints" / "resnet18-f37072fd.pth") in str(error.value)
    assert "local weights file" in str(error.value)
