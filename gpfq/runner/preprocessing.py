"""Which model goes with which data, and how images are prepared for a model.

An ImageFolder (--dataset imagefolder) is read with the model's own preprocessing where it
declares one, in this order:
  1. the model's `preprocess` attribute (a callable PIL image -> tensor);
  2. timm's data config (timm models, and any model carrying timm's `pretrained_cfg`);
  3. torchvision's weights transforms() (torchvision classifiers);
  4. the embedded models: grayscale, 28×28, Fashion-MNIST's mean/std;
  5. the model's `input_size = (C, H, W)` (and optional `mean`, `std`) with the default below;
  6. otherwise the default (gpfq.io.data.default_transform): shorter side to ⌊S·256/224⌋, S×S centre crop,
     ImageNet mean/std, S = 224.
`image_size` (--image_size S) replaces the size in 2–6.
"""

import torch

from gpfq.io.data import DEFAULT_IMAGE_SIZE, FASHION_MNIST_MEAN, FASHION_MNIST_STD, default_transform, image_folder, \
    image_folder_classes
from gpfq.errors import BadInputError, bad_hyperparameter
from gpfq.paths import DATA_DIR
from gpfq.io.models import EMBEDDED_DATASET, check_model_name, is_embedded, is_torchvision
from gpfq.io.user_models import is_timm

FASHION_MNIST_CLASSES = 10


class ModelDataMismatchError(BadInputError, ValueError):
    """A model that cannot take a dataset's images, or has fewer outputs than the dataset has classes."""


def check_model_and_data(model_name, dataset: str, image_size=None, data_dir=None) -> None:
    """ValueError ('bad hyperparameter: …') for a model name that does not resolve, a dataset the model cannot
    take, or a bad image_size; DataMissingError for an ImageFolder without train/, val/ or classes.
    Cheap: imports a user model's module, lists folders, builds nothing.

    Fashion-MNIST (1×28×28) goes with the embedded models and user models; ImageNet with torchvision, timm and
    user models; an ImageFolder with any model (its images are prepared as the model declares).
    """
    check_model_name(model_name)
    if image_size is not None:
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
            raise bad_hyperparameter(f"image_size must be None (the model's own) or an integer ≥ 8, "
                                     f"got {image_size!r}")
        if dataset != "imagefolder":
            raise bad_hyperparameter(f"image_size applies to --dataset imagefolder only (dataset is "
                                     f"{dataset!r}, whose preprocessing is fixed)")
    if dataset == EMBEDDED_DATASET and (is_torchvision(model_name) or is_timm(model_name)):
        raise bad_hyperparameter(f"model {model_name!r} does not go with dataset {dataset!r}: it takes "
                                 f"3-channel images; use imagenet or imagefolder (Fashion-MNIST goes with the embedded "
                                 f"models)")
    if dataset == "imagenet" and is_embedded(model_name):
        raise bad_hyperparameter(f"model {model_name!r} does not go with dataset 'imagenet': the "
                                 f"embedded models take 1×28×28 Fashion-MNIST images; use {EMBEDDED_DATASET} or imagefolder")
    if dataset == "imagefolder":
        image_folder_classes(data_dir or DATA_DIR)


def _attribute(model, name):
    value = getattr(model, name, None)
    return None if isinstance(value, torch.nn.Module) else value


def model_transform(model_name: str, model, image_size=None):
    """(transform PIL image -> tensor, description) for `model` (see the module docstring)."""
    preprocess = _attribute(model, "preprocess")
    if callable(preprocess):
        if image_size is not None:
            raise ModelDataMismatchError(f"model {model_name!r} declares its own preprocess; image_size cannot "
                                         f"change it (leave --image_size out)")
        return preprocess, "the model's own preprocess"
    if is_timm(model_name) or isinstance(getattr(model, "pretrained_cfg", None), dict):
        return _timm_transform(model, image_size)
    if is_torchvision(model_name):
        return _torchvision_transform(model_name, image_size)
    if is_embedded(model_name):
        size = image_size or 28
        return (default_transform(size, channels=1, mean=(FASHION_MNIST_MEAN,), std=(FASHION_MNIST_STD,)),
                f"grayscale, {size}×{size}, Fashion-MNIST mean/std")
    input_size = _attribute(model, "input_size")
    if input_size is not None:
        channels, height, width = tuple(input_size)
        if channels not in (1, 3):
            raise ModelDataMismatchError(f"model {model_name!r} takes {channels}-channel images; images have 1 "
                                         f"or 3: give the model a `preprocess` transform")
        size = image_size or (height, width)
        return (default_transform(size, channels, _attribute(model, "mean"), _attribute(model, "std")),
                f"the model's input_size {tuple(input_size)}" + (f", resized to {image_size}" if image_size else ""))
    size = image_size or DEFAULT_IMAGE_SIZE
    return default_transform(size), f"default: {size}×{size} centre crop, ImageNet mean/std"


def _torchvision_transform(model_name: str, image_size):
    from torchvision import models
    transform = models.get_model_weights(model_name).DEFAULT.transforms()
    if image_size is None:
        return transform, f"torchvision's transforms() of {model_name}"
    from torchvision.transforms._presets import ImageClassification
    crop, resize = transform.crop_size[0], transform.resize_size[0]
    return (ImageClassification(crop_size=image_size, resize_size=round(image_size * resize / crop),
                                mean=tuple(transform.mean), std=tuple(transform.std),
                                interpolation=transform.interpolation),
            f"torchvision's transforms() of {model_name} at {image_size}×{image_size}")


def _timm_transform(model, image_size):
    import timm.data
    config = timm.data.resolve_data_config({}, model=model)
    if image_size is not None:
        config["input_size"] = (config["input_size"][0], image_size, image_size)
    size = config["input_size"]
    return timm.data.create_transform(**config), f"timm's data config, input {size[0]}×{size[1]}×{size[2]}"


def image_folder_sets(model_name: str, model, data_dir, image_size=None, log=print):
    """(train set, val set) of an ImageFolder with the model's preprocessing, labelled by train/'s classes."""
    classes = image_folder_classes(data_dir)
    transform, description = model_transform(model_name, model, image_size)
    log(f"imagefolder {data_dir}: {len(classes)} classes, images prepared with {description}")
    return (image_folder(data_dir, "train", transform, classes), image_folder(data_dir, "val", transform, classes))


def dataset_classes(dataset_name: str, dataset):
    """The number of classes of a dataset, where known."""
    if dataset_name == EMBEDDED_DATASET:
        return FASHION_MNIST_CLASSES
    classes = getattr(dataset, "classes", None)
    return len(classes) if classes is not None else None


@torch.no_grad()
def check_model_takes(model_name: str, model, dataset_name: str, dataset, log=print) -> None:
    """Run one image of `dataset` through `model`: ModelDataMismatchError if the model cannot take it (size,
    channels) or has fewer outputs than the dataset has classes; a warning if it has more (on an ImageFolder)."""
    image = dataset[0][0]
    if not isinstance(image, torch.Tensor):
        raise ModelDataMismatchError(f"the {dataset_name} images are prepared as {type(image).__name__}, not as "
                                     f"tensors: the model's preprocess must end with a tensor")
    shape = "×".join(str(n) for n in image.shape)
    try:
        parameter = next(model.parameters(), None)
        output = model(image.unsqueeze(0).to(parameter.device if parameter is not None else "cpu"))
    except Exception as error:
        first_line = (str(error).strip().splitlines() or [""])[0]
        hint = ("set --image_size, or declare the model's input (input_size = (C, H, W) on the model, or a "
                "preprocess transform)" if dataset_name == "imagefolder" else "use --dataset imagefolder with "
                "images the model takes")
        raise ModelDataMismatchError(f"model {model_name!r} cannot take the {dataset_name} images: one image is "
                                     f"{shape} and the model raised {type(error).__name__}: {first_line}; "
                                     f"{hint}") from None
    if not isinstance(output, torch.Tensor) or output.dim() != 2:
        what = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise ModelDataMismatchError(f"model {model_name!r} returns {what} on one {dataset_name} image; a "
                                     f"classifier returns (batch, classes) logits")
    outputs, classes = output.shape[1], dataset_classes(dataset_name, dataset)
    if classes is None:
        return
    if outputs < classes:
        raise ModelDataMismatchError(f"model {model_name!r} has {outputs} outputs but dataset {dataset_name} has "
                                     f"{classes} classes: build the model for {classes} classes")
    if outputs > classes and dataset_name == "imagefolder":
        log(f"warning: model {model_name!r} has {outputs} outputs and the image folder {classes} classes; "
            f"accuracy counts the i-th class folder (sorted by name) as output i, which means something only if "
            f"those are the model's classes in its order (quantization itself uses no labels)")
