"""Bit identity: the three scripts' default experiments give the same quantized weights as a known-good revision.

The hashes below are sha256 digests of the saved state dicts (every tensor, keys in sorted order, with its
name, dtype and shape) of fashion_resnet quantized by each script's default header (GPFQ, 4 bits, m = 512,
C = 1.3, seed 0), recorded at revision 3ae1224 with torch 2.14.1 on an x86-64 CPU.

Bit identity holds for a given thread count, device and library build: how a matrix product is split across
threads changes the order of its floating-point sums. Every run here therefore uses one thread
(`--num_threads 1`, OMP_NUM_THREADS=1). A different CPU vector unit or torch build may legitimately change the
last bits; a change of code must not.

The slow tests run the scripts themselves, as a user does (command line, logs, saved model). The fast ones
call the library without the evaluations: the plain default as a user would
(`gpfq.quantize(model, dataset, QuantConfig())`), the ad hoc default the way its script does.
"""
import hashlib
import subprocess
import sys

import pytest
import torch

from conftest import python_env, script_header
from gpfq.paths import REPO_ROOT

EXPECTED = {
    "quantization_scripts": "3ffd76c6ce50cec07220544e8333bfe056e6a67a05afe17f31ef812dded66098",
    "adhoc_quantization_scripts": "3127c1414cb028e8096c0f227b31148f8f8e67908b44e1d858b1b1303870ce2f",
    "retraining_scripts": "170b2e8019276aa854da0c03bd1830b54b3f4496193ae5cfa1f335eedda1a353",
}
THREADS = 1


def state_hash(state: dict) -> str:
    """sha256 over a state dict: for each key in sorted order, its name, dtype, shape and raw bytes."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(key.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def test_state_hash_sees_every_bit():
    state = {"a": torch.zeros(3), "b": torch.ones(2, dtype=torch.float64)}
    flipped = {"a": torch.tensor([0.0, 0.0, torch.finfo(torch.float32).tiny]), "b": state["b"]}
    assert state_hash(state) != state_hash(flipped)
    assert state_hash(state) != state_hash({"a": state["a"].reshape(1, 3), "b": state["b"]})
    assert state_hash(state) == state_hash(dict(reversed(list(state.items()))))


def test_plain_default_library(one_thread, default_data):
    """The plain script's default experiment is gpfq.quantize with the default QuantConfig (no evaluation)."""
    import gpfq
    calibration, _, model = default_data
    result = gpfq.quantize(model, calibration, gpfq.QuantConfig(), log=lambda message: None)
    assert state_hash(result.model.state_dict()) == EXPECTED["quantization_scripts"]


@pytest.mark.slow
def test_adhoc_default_library(one_thread, default_data):
    """The ad hoc script's default point (last layer float, its bias corrected), as the script runs it."""
    from gpfq import adhoc
    from gpfq.experiment import Context, expand_grid, parse_overrides
    calibration, evaluation, model = default_data
    point = expand_grid(parse_overrides(script_header("adhoc_quantization_scripts"), []), adhoc.GRID_KEYS)[0]
    torch.manual_seed(point["seed"])
    context = Context(point, calibration, evaluation, model, 0.0, 0.0, "cpu", lambda message: None)
    quantized, _, _ = adhoc.quantize(context)
    assert state_hash(quantized.state_dict()) == EXPECTED["adhoc_quantization_scripts"]


@pytest.mark.slow
@pytest.mark.parametrize("folder", sorted(EXPECTED))
def test_script_default(folder, tmp_path):
    """`python3 quantize.py` from the script's folder, default header, one thread: the saved model's hash."""
    env = dict(python_env(), OMP_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS))
    result = subprocess.run([sys.executable, "quantize.py", "--num_threads", str(THREADS),
                             "--log_dir", str(tmp_path / "logs"), "--model_dir", str(tmp_path / "models")],
                            cwd=REPO_ROOT / folder, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    saved = sorted((tmp_path / "models" / "fashion_resnet").glob("*.pt"))
    assert len(saved) == 1, saved
    state = torch.load(saved[0], map_location="cpu", weights_only=True)
    assert state_hash(state) == EXPECTED[folder]
