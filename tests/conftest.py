import fcntl
import json
import os
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
# pytest-xdist (`make test` runs 2 workers): one torch thread per worker, so the workers share the cores
# instead of oversubscribing them. A lone pytest process keeps torch's default.
# The scripts' num_threads None reads OMP_NUM_THREADS, so the scripts a test runs, in-process or as subprocesses
# (which inherit it), take one thread too: two threads on a core the other worker holds cost 3× the CPU time.
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if XDIST_WORKER:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch
    torch.set_num_threads(1)

import helpers  # noqa: E402 (after OMP_NUM_THREADS: its script server, started from this environment, keeps it)

# The longest test files first (xdist --dist loadfile hands out whole files): a long file started last would keep one
# worker busy after the other has finished. Seconds per file, summed test durations of one 2-worker run (they only
# order the files, so an old or wrong figure costs time, never a result); the unlisted files follow in their order.
FILE_SECONDS = {"test_distributed": 263, "test_quality": 196, "test_activations": 186, "test_reproduce": 159,
                "test_reliability": 148, "test_adhoc": 145, "test_resume_safety": 92, "test_architectures": 87,
                "test_layer_checkpoints": 76, "test_coverage_zoo": 73, "test_onnx_export": 72, "test_inblock": 65,
                "test_warnings_and_scripts": 55, "test_default_model": 51, "test_scripts_and_files": 45,
                "test_methods": 43, "test_retrain": 39, "test_deploy": 35, "test_imagenet_path": 34}


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False  # xdist would order the files by their number of tests instead


def pytest_collection_modifyitems(config, items):
    """Put the files of FILE_SECONDS first, longest first (a stable sort: each file's tests keep their order)."""
    items.sort(key=lambda item: -FILE_SECONDS.get(Path(str(item.fspath)).stem, 0))


def shared_once(tmp_path_factory, name: str, make):
    """make(folder) -> JSON-able value, computed once per test run: the first xdist worker to ask computes it
    into <base>/<name>/ under a lock, the others wait and read it (a lone process just computes it)."""
    base = tmp_path_factory.getbasetemp()
    base = base.parent if XDIST_WORKER else base  # xdist: the workers' base folders share this parent
    folder, done = base / name, base / f"{name}.json"
    with open(base / f"{name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            folder.mkdir(exist_ok=True)
            done.write_text(json.dumps(make(folder)))
    return folder, json.loads(done.read_text())


@pytest.fixture(scope="session", autouse=True)
def accuracy_cache(tmp_path_factory):
    """One float-accuracy cache (gpfq.runner.accuracy_cache) for this test run, shared by its workers and the
    scripts they start (GPFQ_CACHE_DIR is inherited), starting empty: never the user's own cache."""
    base = tmp_path_factory.getbasetemp()
    folder = (base.parent if XDIST_WORKER else base) / "gpfq-cache"
    os.environ["GPFQ_CACHE_DIR"] = str(folder)
    return folder


def python_env(*folders) -> dict:
    """The environment for a Python subprocess: gpfq importable from this checkout (installed or not),
    and `folders` (e.g. TESTS_DIR) importable too."""
    paths = [str(TESTS_DIR.parent)] + [str(f) for f in folders]
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    return dict(os.environ, PYTHONPATH=os.pathsep.join(paths))


def script_header(folder: str) -> dict:
    """The HEADER dict of <folder>/quantize.py."""
    return helpers.script_header(folder)


@pytest.fixture(scope="session")
def default_runs(tmp_path_factory):
    """The plain script's default header at 3 and 4 bits, GPFQ and round-to-nearest (same alphabet).

    Returns (output folder, {(method, bits): logged row}).
    """
    def run(out):
        rows = helpers.run_script("quantization_scripts", "--bits", "3", "4", "--method", "gpfq", "msq", "--log_dir",
                                  str(out / "logs"), "--model_dir", str(out / "models"))
        return [[r["Method"], r["Bits"], r] for r in rows]
    out, rows = shared_once(tmp_path_factory, "default_runs", run)
    return out, {(method, bits): row for method, bits, row in rows}


@pytest.fixture(scope="session")
def default_data():
    """(calibration set, evaluation set, float fashion_resnet): loaded once per test session."""
    from gpfq.io.data import calibration_set, evaluation_set
    from gpfq.io.models import load_model
    return calibration_set("fashion_mnist"), evaluation_set("fashion_mnist"), load_model("fashion_resnet")


@pytest.fixture(scope="session")
def plain_point():
    """The grid point of the plain script's default header at 3 bits (GPFQ), as default_runs ran it."""
    return helpers.grid_points("quantization_scripts", "--bits", "3", "--method", "gpfq")[0]


@pytest.fixture(scope="session")
def make_context(default_data, plain_point):
    """make_context(options=None, **overrides) -> the context (helpers.point_context) of the 3-bit default point
    with `overrides` (no float evaluation), parsed as the runner parses it; options: the script folder's name whose
    own keys are in `overrides` (e.g. "adhoc_quantization_scripts"), or a parser of them."""
    def make(options=None, **overrides):
        return helpers.point_context(dict(plain_point, **overrides), default_data, options)
    return make


@pytest.fixture(scope="session")
def plain_default(default_runs, make_context):
    """3-bit plain GPFQ of the default model, from default_runs: dict(context, model, reports, top1, path)."""
    from gpfq.io.models import load_saved_model
    from gpfq import LayerReport
    _, rows = default_runs
    row = rows[("gpfq", 3)]
    path = Path(row["Model File"])
    if not path.is_absolute():
        from gpfq.paths import REPO_ROOT
        path = REPO_ROOT / path
    context = make_context()
    record = helpers.saved_record(path)
    saved, same = helpers.reuse_settings(record, context.run.header)
    assert saved == same  # make_context() is the point it ran
    reports = [LayerReport(**dict(r, weight_shape=tuple(r["weight_shape"]))) for r in record["layers"]]
    model = load_saved_model(path, context.analog_model)
    return dict(context=context, model=model, reports=reports, top1=row["Quantized Top1 Accuracy"], path=path)


PHOTOS = ("astronaut", "chelsea", "coffee")  # scikit-image's bundled colour photos: one class each


def write_photo_folder(root: Path, train_per_class: int = 6, val_per_class: int = 3, crop: int = 96) -> Path:
    """An ImageFolder of real images: random crop×crop JPEG crops of scikit-image's photos, one class per photo,
    root/train/<photo>/*.jpg and root/val/<photo>/*.jpg (different crops)."""
    import numpy as np
    import skimage.data
    from PIL import Image
    rng = np.random.default_rng(0)
    for name in PHOTOS:
        photo = getattr(skimage.data, name)()
        for split, count in (("train", train_per_class), ("val", val_per_class)):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                top = int(rng.integers(0, photo.shape[0] - crop))
                left = int(rng.integers(0, photo.shape[1] - crop))
                Image.fromarray(photo[top:top + crop, left:left + crop]).save(root / split / name / f"{i}.jpg")
    return root


@pytest.fixture(scope="session")
def photo_folder(tmp_path_factory):
    """A tiny ImageFolder of crops of real photos (3 classes; 6 train and 3 val images each)."""
    return write_photo_folder(tmp_path_factory.mktemp("photos"))
