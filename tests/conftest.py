import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest  # noqa: E402
import torch  # noqa: E402

# The default task, made small enough for the test budget: fashion_resnet (shipped weights) on
# Fashion-MNIST, 3 bits, m = 256 calibration images per layer.
DEFAULT_TEST_POINT = dict(
    model_name="fashion_resnet", dataset="fashion_mnist", weights="DEFAULT", method="gpfq", bits=3, batch_size=256,
    mlp_scalar=1.3, cnn_scalar=1.3, mlp_percentile=1.0, cnn_percentile=1.0, alphabet="gpfq2022", include_0=True,
    retain_rate=0.25, patch_stride="kernel", ignore_layers=[], seed=0, author="", num_workers=0, device="cpu",
    log_dir=None, model_dir=None, data_dir=None)


@pytest.fixture(scope="session")
def default_data():
    """(calibration set, evaluation set, float fashion_resnet): loaded once per test session."""
    from gpfq.data import calibration_set, evaluation_set
    from gpfq.models import load_model
    return calibration_set("fashion_mnist"), evaluation_set("fashion_mnist"), load_model("fashion_resnet")


@pytest.fixture(scope="session")
def make_context(default_data):
    """make_context(**overrides) -> a gpfq.experiment.Context on the default test point (no float evaluation)."""
    from gpfq.experiment import Context
    calibration, evaluation, model = default_data

    def make(**overrides):
        return Context(dict(DEFAULT_TEST_POINT, **overrides), calibration, evaluation, model, 0.0, 0.0, "cpu", print)
    return make


@pytest.fixture(scope="session")
def plain_default(make_context, tmp_path_factory):
    """Plain GPFQ on the default test point, saved like run_point saves it (with its JSON sidecar).

    Returns dict(context, model, reports, top1, path).
    """
    from gpfq.evaluate import evaluate
    from gpfq.experiment import plain_quantize, save_model
    from gpfq.network import reports_as_dicts
    context = make_context()
    torch.manual_seed(0)
    model, reports, _ = plain_quantize(context)
    top1, _ = evaluate(model, context.loader(), progress=False)
    record = {"hyperparameters": dict(context.point), "layers": reports_as_dicts(reports)}
    path = save_model(model, record, tmp_path_factory.mktemp("models"), "plain_b3")
    return dict(context=context, model=model, reports=reports, top1=top1, path=path)
