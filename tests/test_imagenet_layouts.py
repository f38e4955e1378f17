"""ImageNet's real layouts, offline, on a synthetic mini-ILSVRC2012 (3 wnids, small random JPEGs): labels are the
index of the image's true wnid in sorted order; an incomplete layout is one clear error (exit 2 from a script).
And --eval_subset's class-balanced subset (gpfq.io.data.eval_subset) on Fashion-MNIST."""
import csv
import io
import sys
import tarfile

import numpy as np
import pytest
import scipy.io
from conftest import python_env
from helpers import run_python
from PIL import Image

from gpfq.io.data import DataMissingError, eval_subset, evaluation_set, fashion_mnist
from gpfq.errors import BadHyperparameterError
from gpfq.paths import REPO_ROOT

# deliberately not in sorted order: the ILSVRC2012_IDs (1, 2, 3) do not follow the wnids' order
WNIDS = ["n02119789", "n01440764", "n01484850"]
SORTED = sorted(WNIDS)
VAL_TRUTH = ["n01484850", "n02119789", "n01440764", "n02119789", "n01484850", "n01440764", "n02119789"]


def jpeg(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (20, 24, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, "JPEG")


def val_name(k):
    return f"ILSVRC2012_val_{k + 1:08d}"


def write_train(root):
    for c, wnid in enumerate(WNIDS):
        for i in range(2 + c % 2):
            jpeg(root / "train" / wnid / f"{wnid}_{i}.JPEG", 10 * c + i)


def write_flat_val(root):
    for k in range(len(VAL_TRUTH)):
        jpeg(root / "val" / f"{val_name(k)}.JPEG", 100 + k)


def write_devkit(root, truth=VAL_TRUTH):
    """The devkit archive: data/meta.mat (a 'synsets' struct array, leaves and one parent synset) and the
    ground truth (one ILSVRC2012_ID per validation image)."""
    ids = {wnid: i + 1 for i, wnid in enumerate(WNIDS)}
    fields = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("gloss", "O"), ("num_children", "O"),
              ("children", "O"), ("wordnet_height", "O"), ("num_train_images", "O")]
    synsets = np.zeros((len(WNIDS) + 1,), dtype=fields)
    for i, wnid in enumerate(WNIDS):
        synsets[i] = (ids[wnid], wnid, f"class {wnid}, other name", "a gloss", 0, np.zeros(0), 0, 3)
    synsets[-1] = (len(WNIDS) + 1, "n00001740", "entity", "a parent, not a class", len(WNIDS),
                   np.arange(1, len(WNIDS) + 1), 5, 0)
    meta = io.BytesIO()
    scipy.io.savemat(meta, {"synsets": synsets})
    members = {"ILSVRC2012_devkit_t12/data/meta.mat": meta.getvalue(),
               "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt":
                   "".join(f"{ids[w]}\n" for w in truth).encode()}
    with tarfile.open(root / "ILSVRC2012_devkit_t12.tar.gz", "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def write_kaggle(root, rows=None):
    (root / "LOC_synset_mapping.txt").write_text("".join(f"{w} class {w}, other name\n" for w in WNIDS))
    with open(root / "LOC_val_solution.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["ImageId", "PredictionString"])
        for k, wnid in (rows if rows is not None else list(enumerate(VAL_TRUTH))):
            writer.writerow([val_name(k), f"{wnid} 1 2 10 12 {wnid} 3 4 8 9"])


def labels_by_file(dataset) -> dict:
    return {path.split("/")[-1]: label for path, label in dataset.samples}


def check_flat_labels(root):
    validation = evaluation_set("imagenet", root.parent)
    assert labels_by_file(validation) == {f"{val_name(k)}.JPEG": SORTED.index(w) for k, w in enumerate(VAL_TRUTH)}
    image, label = validation[0]
    assert image.shape == (3, 224, 224) and label == SORTED.index(VAL_TRUTH[0])


@pytest.fixture
def root(tmp_path):
    return tmp_path / "data" / "ILSVRC2012"


def test_train_in_class_folders(root):
    from gpfq.io.data import calibration_set
    write_train(root)
    train = calibration_set("imagenet", root.parent)
    expected = {f"{w}_{i}.JPEG": SORTED.index(w) for c, w in enumerate(WNIDS) for i in range(2 + c % 2)}
    assert labels_by_file(train) == expected


def test_val_in_class_folders(root):
    write_train(root)
    for k, wnid in enumerate(VAL_TRUTH):
        jpeg(root / "val" / wnid / f"{val_name(k)}.JPEG", 100 + k)
    validation = evaluation_set("imagenet", root.parent)
    assert labels_by_file(validation) == {f"{val_name(k)}.JPEG": SORTED.index(w) for k, w in enumerate(VAL_TRUTH)}


def test_flat_val_with_the_devkit(root):
    write_train(root)
    write_flat_val(root)
    write_devkit(root)
    check_flat_labels(root)
    assert not (root / "meta.bin").exists()  # nothing written beside the data


def test_kaggle_layout(root):
    write_flat_val(root)
    write_kaggle(root)
    check_flat_labels(root)


def test_kaggle_nested_folders(root):
    """Kaggle's download: ILSVRC/Data/CLS-LOC/{train,val} with the LOC files at the top."""
    nested = root / "ILSVRC" / "Data" / "CLS-LOC"
    write_train(nested)
    write_flat_val(nested)
    write_kaggle(root)
    from gpfq.io.data import calibration_set
    assert len(calibration_set("imagenet", root.parent)) == 7
    check_flat_labels(root)


@pytest.mark.parametrize("broken,message", [
    ("no labels", "holds images in no class folders, and nothing labels them"),
    ("devkit short", "holds 7 images but the devkit labels 6"),
    ("devkit corrupt", "cannot read the validation labels from"),
    ("kaggle row missing", "have no row in it (e.g. ILSVRC2012_val_00000007.JPEG)"),
    ("val classes", "has class folders other than"),
])
def test_incomplete_layouts_are_one_clear_error(root, broken, message):
    write_train(root)
    if broken == "val classes":
        for k, wnid in enumerate(VAL_TRUTH[:3]):  # n01440764 has no folder
            if wnid != "n01440764":
                jpeg(root / "val" / wnid / f"{val_name(k)}.JPEG", k)
    else:
        write_flat_val(root)
    if broken == "devkit short":
        write_devkit(root, VAL_TRUTH[:-1])
    if broken == "devkit corrupt":
        (root / "ILSVRC2012_devkit_t12.tar.gz").write_bytes(b"not a tar")
    if broken == "kaggle row missing":
        write_kaggle(root, list(enumerate(VAL_TRUTH))[:-1])
    with pytest.raises(DataMissingError, match=message.replace("(", r"\(").replace(")", r"\)")):
        evaluation_set("imagenet", root.parent)


def test_incomplete_layout_from_the_script_is_one_line_and_exit_2(root):
    write_train(root)
    write_flat_val(root)
    result = run_python([sys.executable, str(REPO_ROOT / "quantization_scripts" / "quantize.py"), "--model",
                         "resnet18", "--dataset", "imagenet", "--weights", "random", "--batch_size", "2",
                         "--data_dir", str(root.parent), "--log_dir", str(root / "logs"), "--model_dir",
                         str(root / "models")], capture_output=True, text=True, env=python_env(), timeout=120)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "nothing labels them" in lines[0]


def test_eval_subset_is_the_first_images_of_each_class():
    """100 of Fashion-MNIST's test set: the first 10 of each class, in the set's order (from the raw labels)."""
    test = fashion_mnist("test")
    labels = test.tensors[1].numpy()
    subset = eval_subset(test, 100)
    expected = sorted(i for c in range(10) for i in np.flatnonzero(labels == c)[:10])
    assert list(subset.indices) == expected and len(subset) == 100
    assert np.bincount(labels[subset.indices], minlength=10).tolist() == [10] * 10
    uneven = eval_subset(test, 25)  # 2 each, and one more for classes 0-4
    assert np.bincount(labels[uneven.indices], minlength=10).tolist() == [3] * 5 + [2] * 5


def test_eval_subset_refuses_what_the_set_cannot_give(root):
    with pytest.raises(BadHyperparameterError, match="larger than the evaluation set"):
        eval_subset(fashion_mnist("test"), 10001)
    write_train(root)
    write_flat_val(root)
    write_kaggle(root)  # n01440764 has 2 validation images
    with pytest.raises(BadHyperparameterError, match="has only 2 in the evaluation set"):
        eval_subset(evaluation_set("imagenet", root.parent), 7)  # 3 for class 0 (the first), 2 for the others
