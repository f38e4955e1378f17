"""Datasets: the embedded Fashion-MNIST default, ImageNet (ILSVRC2012), and any ImageFolder.

Every dataset yields (image tensor, label). `calibration_set` is what GPFQ
draws layer inputs from (a train split); `evaluation_set` is what accuracy is
measured on (test / validation split).
"""
import gzip
import io
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from gpfq.errors import BadInputError, bad_hyperparameter
from gpfq.paths import DATA_DIR

DATASETS = ("fashion_mnist", "imagenet", "imagefolder")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # ImageFolder's

FASHION_MNIST_DEBIAN = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class DataMissingError(BadInputError, FileNotFoundError):
    """A dataset is not where the project looks for it."""


class CorruptImageError(BadInputError, OSError):
    """An image file that cannot be decoded (corrupt or truncated)."""


def load_image(path):
    """An image file as RGB; CorruptImageError naming the file if it cannot be decoded.

    A bad image stops the run rather than being skipped: skipping would change the calibration
    draw and the number of images accuracy is measured on, so results would no longer compare.
    """
    from PIL import Image
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise CorruptImageError(f"cannot decode image {path} ({type(error).__name__}: {error}). The file is corrupt "
                                f"or truncated: replace it with a good copy (a train image may also be deleted) "
                                f"and run again") from error


def _read_idx(path: Path) -> np.ndarray:
    """Read a gzip'd idx file (the MNIST format) into a uint8 array."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte idx file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _fashion_mnist_dir(data_dir: Path) -> Path:
    """Where the four gzip idx files are: Debian's package, data/FashionMNIST/raw, or downloaded there."""
    for folder in (FASHION_MNIST_DEBIAN, Path(data_dir) / "FashionMNIST" / "raw"):
        if all((folder / name).exists() for pair in FASHION_MNIST_FILES.values() for name in pair):
            return folder
    try:
        from torchvision.datasets import FashionMNIST
        FashionMNIST(str(data_dir), train=True, download=True)
        FashionMNIST(str(data_dir), train=False, download=True)
    except Exception as error:  # no network, no package
        raise DataMissingError(
            "Fashion-MNIST not found. Install Debian's package (apt-get install dataset-fashion-mnist, "
            f"files in {FASHION_MNIST_DEBIAN}) or put the four *-ubyte.gz files in "
            f"{Path(data_dir) / 'FashionMNIST' / 'raw'}; the download failed: {error}") from error
    return Path(data_dir) / "FashionMNIST" / "raw"


def fashion_mnist(split: str, data_dir=DATA_DIR) -> TensorDataset:
    """Fashion-MNIST 'train' (60k) or 'test' (10k): normalized (N, 1, 28, 28) float images, int64 labels."""
    folder = _fashion_mnist_dir(Path(data_dir))
    image_file, label_file = FASHION_MNIST_FILES[split]
    images = torch.from_numpy(_read_idx(folder / image_file).copy()).float().div_(255.0)
    images = images.sub_(FASHION_MNIST_MEAN).div_(FASHION_MNIST_STD).unsqueeze(1)
    labels = torch.from_numpy(_read_idx(folder / label_file).astype(np.int64))
    return TensorDataset(images, labels)


def imagenet_transform():
    """The paper's preprocessing: Resize(256), CenterCrop(224), ImageNet mean/std."""
    from torchvision import transforms
    return transforms.Compose([
        transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


DEFAULT_IMAGE_SIZE = 224


def default_transform(image_size=DEFAULT_IMAGE_SIZE, channels: int = 3, mean=None, std=None):
    """The preprocessing of a model that declares none: the shorter side resized to ⌊S·256/224⌋, an S×S (or H×W)
    centre crop, and the ImageNet mean/std (their channel average for one channel)."""
    from torchvision import transforms
    height, width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if mean is None:
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else ((sum(IMAGENET_MEAN) / 3,) * channels,
                                                                         (sum(IMAGENET_STD) / 3,) * channels)
    steps = [transforms.Grayscale(channels)] if channels != 3 else []
    return transforms.Compose(steps + [
        transforms.Resize(int(min(height, width) * 256 / 224)), transforms.CenterCrop((height, width)),
        transforms.ToTensor(), transforms.Normalize(tuple(mean), tuple(std))])


DEVKIT = "ILSVRC2012_devkit_t12.tar.gz"
KAGGLE_SOLUTION, KAGGLE_SYNSETS = "LOC_val_solution.csv", "LOC_synset_mapping.txt"
KAGGLE_IMAGES = Path("ILSVRC") / "Data" / "CLS-LOC"  # where Kaggle's download keeps train/ and val/


def _imagenet_missing(root: Path, what: str) -> DataMissingError:
    return DataMissingError(
        f"ImageNet {what} not found under {root}. Put ILSVRC2012 there as data/README.md describes: "
        f"train/<wnid>/*.JPEG, and val/ either in class folders val/<wnid>/*.JPEG or flat "
        f"(val/ILSVRC2012_val_*.JPEG) with {DEVKIT} beside it (or Kaggle's {KAGGLE_SOLUTION} and {KAGGLE_SYNSETS}).")


def imagenet(split: str, root) -> torch.utils.data.Dataset:
    """ILSVRC2012 'train' or 'val' as an ImageFolder-like dataset with the paper's transform.

    Accepted layouts under `root`: train/<wnid>/…; val/<wnid>/… (class folders; the same classes as
    train/); flat val/*.JPEG with the devkit (ILSVRC2012_devkit_t12.tar.gz, or torchvision's meta.bin made
    from it), or with Kaggle's LOC_val_solution.csv and LOC_synset_mapping.txt (train/ and val/ also under
    ILSVRC/Data/CLS-LOC/, as Kaggle unpacks them); or the original archives, which torchvision's ImageNet
    dataset unpacks. Labels are the index of the wnid in sorted order (torchvision's convention).
    """
    from torchvision import datasets
    root = Path(root)
    transform = imagenet_transform()
    folder = root / split
    if not folder.is_dir() and (root / KAGGLE_IMAGES / split).is_dir():
        folder = root / KAGGLE_IMAGES / split
    archive = {"train": "ILSVRC2012_img_train.tar", "val": "ILSVRC2012_img_val.tar"}[split]
    if folder.is_dir() and any(p.is_dir() for p in folder.iterdir()):
        dataset = datasets.ImageFolder(str(folder), transform=transform, loader=load_image)
        train = folder.parent / "train"
        if split == "val" and train.is_dir():
            trained = sorted(p.name for p in train.iterdir() if p.is_dir())
            if trained and dataset.classes != trained:  # the labels would be another class's
                differ = sorted(set(dataset.classes) ^ set(trained))[:3]
                raise DataMissingError(f"{folder} has class folders other than {train}'s ({len(dataset.classes)} "
                                       f"against {len(trained)}, e.g. {differ}): labels are indices in the sorted "
                                       f"wnids, so both need the same classes")
        return dataset
    if split == "val" and folder.is_dir():
        if (root / "meta.bin").exists() or (root / DEVKIT).exists():
            return _flat_imagenet_val(root, folder, transform)
        if (root / KAGGLE_SOLUTION).exists() and (root / KAGGLE_SYNSETS).exists():
            return _kaggle_imagenet_val(root, folder, transform)
        raise DataMissingError(f"{folder} holds images in no class folders, and nothing labels them: put {DEVKIT} "
                               f"(or torchvision's meta.bin) in {root}, or Kaggle's {KAGGLE_SOLUTION} and "
                               f"{KAGGLE_SYNSETS}; see data/README.md")
    if (root / archive).exists() and ((root / DEVKIT).exists() or (root / "meta.bin").exists()):
        return datasets.ImageNet(str(root), split=split, transform=transform, loader=load_image)
    raise _imagenet_missing(root, split)


class LabelledImages(torch.utils.data.Dataset):
    """Image files with known labels: samples is [(path, label)], like ImageFolder's."""

    def __init__(self, samples, classes, transform):
        self.samples, self.classes, self.transform, self.loader = samples, classes, transform, load_image

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, label = self.samples[index]
        return self.transform(self.loader(path)), label


def _flat_files(folder: Path) -> list:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpeg", ".jpg", ".png") and p.is_file())


def devkit_labels(archive: Path):
    """(wnids of the 1000 classes, wnid of each validation image in file order) from the devkit archive:
    data/meta.mat's 'synsets' (ILSVRC2012_ID, WNID, …, num_children; the leaves are the classes) and
    data/ILSVRC2012_validation_ground_truth.txt (one ILSVRC2012_ID per image). DataMissingError if unreadable."""
    import tarfile
    from scipy.io import loadmat
    base = "ILSVRC2012_devkit_t12/data/"
    try:
        with tarfile.open(archive) as tar:
            meta = tar.extractfile(base + "meta.mat").read()
            truth = tar.extractfile(base + "ILSVRC2012_validation_ground_truth.txt").read().split()
        synsets = np.atleast_1d(loadmat(io.BytesIO(meta), squeeze_me=True)["synsets"])
        by_id = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets if int(s["num_children"]) == 0}
        return sorted(by_id.values()), [by_id[int(number)] for number in truth]
    except (OSError, EOFError, KeyError, ValueError, IndexError, tarfile.TarError) as error:
        raise DataMissingError(f"cannot read the validation labels from {archive} ({type(error).__name__}: "
                               f"{error}); it should hold {base}meta.mat and "
                               f"{base}ILSVRC2012_validation_ground_truth.txt (the official devkit)") from error


def _flat_imagenet_val(root: Path, folder: Path, transform) -> LabelledImages:
    """Flat val/*.JPEG (sorted names: image k is ILSVRC2012_val_<k>) labelled by torchvision's meta.bin or
    the devkit archive."""
    if (root / "meta.bin").exists():
        from torchvision.datasets.imagenet import load_meta_file
        wnid_to_classes, val_wnids = load_meta_file(str(root))
        wnids = sorted(wnid_to_classes)
    else:
        wnids, val_wnids = devkit_labels(root / DEVKIT)
    files = _flat_files(folder)
    if len(files) != len(val_wnids):
        raise DataMissingError(f"{folder} holds {len(files)} images but the devkit labels {len(val_wnids)}")
    class_index = {wnid: i for i, wnid in enumerate(wnids)}  # torchvision's class order: sorted WordNet ids
    return LabelledImages([(str(p), class_index[w]) for p, w in zip(files, val_wnids)], wnids, transform)


def _kaggle_imagenet_val(root: Path, folder: Path, transform) -> LabelledImages:
    """Flat val/ labelled by Kaggle's LOC_val_solution.csv (ImageId, PredictionString: the first token is the
    wnid) over the classes of LOC_synset_mapping.txt ('<wnid> <words>' per line)."""
    import csv
    wnids = sorted(line.split()[0] for line in (root / KAGGLE_SYNSETS).read_text().splitlines() if line.strip())
    class_index = {wnid: i for i, wnid in enumerate(wnids)}
    with open(root / KAGGLE_SOLUTION, newline="") as f:
        truth = {row["ImageId"]: row["PredictionString"].split()[0] for row in csv.DictReader(f)
                 if row.get("ImageId") and (row.get("PredictionString") or "").split()}
    files = _flat_files(folder)
    unlabelled = [p.name for p in files if p.stem not in truth]
    missing = sorted(set(truth) - {p.stem for p in files})
    unknown = sorted({w for w in truth.values() if w not in class_index})
    if unlabelled or missing or unknown:
        what = (f"{len(unlabelled)} images of {folder} have no row in it (e.g. {unlabelled[0]})" if unlabelled else
                f"{len(missing)} of its images are not in {folder} (e.g. {missing[0]})" if missing else
                f"its wnids {unknown[:3]} are not in {KAGGLE_SYNSETS}")
        raise DataMissingError(f"{root / KAGGLE_SOLUTION} does not fit the flat validation folder: {what}")
    return LabelledImages([(str(p), class_index[truth[p.stem]]) for p in files], wnids, transform)


def _image_files(folder: Path) -> list:
    """The image files under `folder` (any depth), sorted, as ImageFolder finds them."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def image_folder_classes(root) -> list:
    """The class names of an ImageFolder dataset: root/train/<class>/<image>, root/val/<class>/<image>.

    DataMissingError, naming what is missing, for: no root, no train/ or val/, no class folders,
    a class folder of train/ without images, or a class of val/ that train/ does not have.
    Only folder listings are read (plus the first image of each class).
    """
    root = Path(root)
    layout = ("--dataset imagefolder reads DIR/train/<class>/<image> (calibration) and DIR/val/<class>/<image> "
              "(evaluation) from --data_dir DIR")
    if not root.is_dir():
        raise DataMissingError(f"image folder {root} does not exist; {layout}")
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise DataMissingError(f"image folder {root} has no {split}/ folder; {layout}")
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    if not classes:
        raise DataMissingError(f"{root / 'train'} has no class folders (train/<class>/<image>); {layout}")
    def has_image(folder):
        return any(p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() for p in folder.rglob("*"))
    empty = [c for c in classes if not has_image(root / "train" / c)]
    if empty:
        raise DataMissingError(f"class folders of {root / 'train'} without images: {', '.join(empty[:5])}"
                               f"{' …' if len(empty) > 5 else ''} (image files end in {', '.join(IMAGE_EXTENSIONS)})")
    foreign = sorted(p.name for p in (root / "val").iterdir() if p.is_dir() and p.name not in classes)
    if foreign:
        raise DataMissingError(f"{root / 'val'} has classes that {root / 'train'} lacks: {', '.join(foreign[:5])}; "
                               f"the labels are the train/ class folders in sorted order")
    return classes


def image_folder(root, split: str, transform, classes=None) -> "LabelledImages":
    """root/<split>/<class>/<image> labelled by the index of its class in `classes` (train/'s, sorted)."""
    root = Path(root)
    classes = image_folder_classes(root) if classes is None else classes
    samples = [(str(path), label) for label, name in enumerate(classes) if (root / split / name).is_dir()
               for path in _image_files(root / split / name)]
    if not samples:
        raise DataMissingError(f"{root / split} has no images in the class folders {', '.join(classes[:5])}"
                               f"{' …' if len(classes) > 5 else ''}")
    return LabelledImages(samples, classes, transform)


def dataset_label(name: str, data_dir=None, image_size=None) -> str:
    """The dataset as the log names it: an ImageFolder with its folder (and image size, when set)."""
    if name != "imagefolder":
        return name
    label = f"imagefolder:{Path(data_dir or DATA_DIR).resolve()}"
    return label + (f"@{image_size}" if image_size else "")


def calibration_set(name: str, data_dir=DATA_DIR):
    """The split GPFQ draws calibration images from."""
    if name == "fashion_mnist":
        return fashion_mnist("train", data_dir)
    if name == "imagenet":
        return imagenet("train", Path(data_dir) / "ILSVRC2012")
    if name == "imagefolder":  # the model's own preprocessing: gpfq.runner.preprocessing.image_folder_sets
        return image_folder(data_dir, "train", default_transform())
    raise ValueError(f"unknown dataset {name!r}; choose one of {DATASETS}")


def evaluation_set(name: str, data_dir=DATA_DIR):
    """The split accuracy is measured on."""
    if name == "fashion_mnist":
        return fashion_mnist("test", data_dir)
    if name == "imagenet":
        return imagenet("val", Path(data_dir) / "ILSVRC2012")
    if name == "imagefolder":
        return image_folder(data_dir, "val", default_transform())
    raise ValueError(f"unknown dataset {name!r}; choose one of {DATASETS}")


def dataset_labels(dataset) -> list:
    """The label of every item, read without decoding images where the dataset keeps them (samples, targets,
    a TensorDataset's second tensor; through Subsets); else item by item."""
    if isinstance(dataset, torch.utils.data.Subset):
        labels = dataset_labels(dataset.dataset)
        return [labels[i] for i in dataset.indices]
    if hasattr(dataset, "samples"):
        return [int(label) for _, label in dataset.samples]
    if getattr(dataset, "targets", None) is not None:
        return [int(label) for label in dataset.targets]
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) > 1:
        return dataset.tensors[1].tolist()
    return [int(dataset[i][1]) for i in range(len(dataset))]


def eval_subset(dataset, n: int) -> torch.utils.data.Subset:
    """A fixed class-balanced subset of n images: with K classes (the distinct labels), each class gets
    ⌊n/K⌋ images and the first n mod K classes (in label order) one more; a class's images are its first
    ones in the dataset's order (sorted files for image folders). The subset keeps the dataset's order.
    BadHyperparameterError when n exceeds the set or a class has fewer images than its share."""
    labels = dataset_labels(dataset)
    if n > len(labels):
        raise bad_hyperparameter(f"eval_subset {n} is larger than the evaluation set ({len(labels)} images)")
    classes = sorted(set(labels))
    share = {label: n // len(classes) + (rank < n % len(classes)) for rank, label in enumerate(classes)}
    counts = {label: labels.count(label) for label in classes}
    short = [label for label in classes if counts[label] < share[label]]
    if short:
        raise bad_hyperparameter(f"eval_subset {n} takes {share[short[0]]} images of each class, but class "
                                 f"{short[0]} has only {counts[short[0]]} in the evaluation set")
    taken, indices = dict.fromkeys(classes, 0), []
    for index, label in enumerate(labels):
        if taken[label] < share[label]:
            taken[label] += 1
            indices.append(index)
    return torch.utils.data.Subset(dataset, indices)


def evaluation_loader(dataset, batch_size: int = 256, num_workers: int = 0) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
