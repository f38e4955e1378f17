"""Prove that a change of code changed no bit, on the machine at hand.

    python3 scripts/check_identity.py --against main          # the working tree against revision `main`
    python3 scripts/check_identity.py --against HEAD~3 --revision HEAD
    python3 scripts/check_identity.py --environments "" "ONEDNN_MAX_CPU_ISA=AVX2 MKL_CBWR=AVX2"

The same fixed list of configurations (CONFIGURATIONS below) runs in a fresh process for each side, on one
thread, here: the three scripts' default experiments (run as a user runs them: `quantize.py`, its saved model
file hashed); ResNet-18 (random weights, fixed seed, 48 px) through the public API, `gpfq.quantize`, in both
calibration modes; and a small CNN through the API with GPTQ, Qronos, SPFQ, a per-channel alphabet, the
streamed Gram form and kept rows.
Each side prints a sha256 of every quantized state dict; the table says `equal` or, where the bits differ,
how much: the fraction of equal weights, the largest change of a layer's relative error and of top-1.
Exit status 0 when every configuration is equal, 1 otherwise.

Bit identity is a same-machine promise (same CPU, library build, thread count and world size; see
docs/testing.md). `--environments` compares settings of the working tree instead of revisions: that is how the
cross-machine tolerances of tests/test_quality.py were measured (the spread between vector-unit settings).
"""
import argparse
import hashlib
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT_FOLDERS = ("quantization_scripts", "adhoc_quantization_scripts", "retraining_scripts")
# name -> (model, the QuantConfig fields; the rest default: GPFQ, 4 bits, C = 1.3)
API_CONFIGURATIONS = {
    "resnet18 fresh": ("resnet18", {}),
    "resnet18 fixed": ("resnet18", {"calibration": "fixed"}),
    "cnn gptq": ("cnn", {"method": "gptq"}),
    "cnn qronos": ("cnn", {"method": "qronos"}),
    "cnn spfq": ("cnn", {"method": "spfq"}),
    "cnn per-channel": ("cnn", {"alphabet_granularity": "channel"}),
    "cnn streamed (gram)": ("cnn", {"engine": "gram"}),
    "cnn kept rows (residual)": ("cnn", {"engine": "residual"}),
}
CONFIGURATIONS = tuple(f"{folder} default" for folder in SCRIPT_FOLDERS) + tuple(API_CONFIGURATIONS)
# model -> (calibration images, their side, m)
API_DATA = {"resnet18": (8, 48, 4), "cnn": (32, 32, 16)}


# ---------------------------------------------------------------- worker: runs in the side's own process
def state_hash(state: dict) -> str:
    """sha256 over a state dict: for each key in sorted order, its name, dtype, shape and raw bytes."""
    import torch
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.view(torch.int16)
        digest.update(key.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def run_script(folder: str, side_root: Path, work: Path) -> dict:
    """`python3 quantize.py` of the side's folder, default header, OMP_NUM_THREADS threads (one by default)."""
    import csv
    import torch
    out = work / folder
    command = [sys.executable, "quantize.py", "--num_threads", os.environ["OMP_NUM_THREADS"], "--log_dir", str(out / "logs"),
               "--model_dir", str(out / "models")]
    result = subprocess.run(command, cwd=side_root / folder, env=os.environ.copy(), capture_output=True,
                            text=True)
    if result.returncode != 0:
        return {"failed": (result.stdout + result.stderr)[-2000:]}
    saved = sorted((out / "models").rglob("*.pt"))
    state = torch.load(saved[0], map_location="cpu", weights_only=True)
    with open(next((out / "logs").glob("*.csv")), newline="") as handle:
        row = list(csv.DictReader(handle))[-1]
    record = json.loads(saved[0].with_suffix(".json").read_text())
    errors = [layer["relative_error"] for layer in record.get("layers", [])]
    return {"state": str(saved[0]), "sha256": state_hash(state), "errors": errors,
            "top1": float(row["Quantized Top1 Accuracy"])}


def small_cnn():
    """Conv-BN-ReLU ×2, a plain conv, a Linear head: every layer kind of the methods, seconds to quantize."""
    from torch import nn
    return nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, stride=2), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Conv2d(32, 32, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def run_api(name: str, work: Path) -> dict:
    """ResNet-18 (torchvision) or small_cnn, random weights of seed 0, on random images, through gpfq.quantize."""
    import torch
    import torchvision
    from torch.utils.data import TensorDataset
    import gpfq
    architecture, fields = API_CONFIGURATIONS[name]
    count, side, batch_size = API_DATA[architecture]
    torch.manual_seed(0)
    model = (torchvision.models.resnet18(weights=None) if architecture == "resnet18" else small_cnn()).eval()
    images = torch.randn(count, 3, side, side, generator=torch.Generator().manual_seed(1))
    data = TensorDataset(images, torch.zeros(count, dtype=torch.long))
    config = gpfq.QuantConfig(batch_size=batch_size, **fields)
    result = gpfq.quantize(model, data, config, log=lambda *_: None)
    state = result.model.state_dict()
    path = work / (name.replace(" ", "_").replace("(", "").replace(")", "") + ".pt")
    torch.save(state, path)
    return {"state": str(path), "sha256": state_hash(state),
            "errors": [report.relative_error for report in result.reports]}


def worker(names: list, side_root: Path, work: Path) -> dict:
    import torch
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    results = {}
    for name in names:
        started = time.perf_counter()
        folder = name[:-len(" default")] if name.endswith(" default") else None
        try:
            results[name] = run_script(folder, side_root, work) if folder else run_api(name, work)
        except Exception as error:  # a configuration the side cannot run is reported, not fatal
            results[name] = {"failed": f"{type(error).__name__}: {error}"}
        results[name]["seconds"] = time.perf_counter() - started
        print(f"  {name}: {results[name].get('sha256', 'failed')[:16]} "
              f"({results[name]['seconds']:.0f} s)", file=sys.stderr, flush=True)
    return results


# ---------------------------------------------------------------- driver
def source_of(revision, into: Path) -> Path:
    """The tree of `revision` (None: this working tree, uncommitted changes included)."""
    if revision is None:
        return REPO_ROOT
    commit = subprocess.run(["git", "rev-parse", "--verify", f"{revision}^{{commit}}"], cwd=REPO_ROOT,
                            capture_output=True, text=True)
    if commit.returncode != 0:
        raise SystemExit(f"error: {revision!r} is not a revision of this repository")
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", commit.stdout.strip()], cwd=REPO_ROOT, capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def run_side(label: str, side_root: Path, extra_env: dict, names: list, work: Path) -> dict:
    """The worker in a fresh process: gpfq imported from side_root, one thread unless extra_env sets
    OMP_NUM_THREADS, extra_env set."""
    work.mkdir(parents=True, exist_ok=True)
    path = [str(side_root)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               TQDM_DISABLE="1")
    env.update(extra_env)
    output = work / "results.json"
    print(f"{label}: {len(names)} configurations", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, __file__, "--worker", str(side_root), str(output)] + names, env=env,
                   check=True)
    return json.loads(output.read_text())


def compare(first: dict, second: dict) -> str:
    """'equal', or how far apart two results of one configuration are."""
    import torch
    if "failed" in first or "failed" in second:
        return "not run: " + (first.get("failed") or second.get("failed")).strip().splitlines()[-1]
    if first["sha256"] == second["sha256"]:
        return "equal"
    a = torch.load(first["state"], weights_only=True)
    b = torch.load(second["state"], weights_only=True)
    same = sum(int((a[k] == b[k]).sum()) for k in a if k in b and a[k].shape == b[k].shape)
    total = sum(a[k].numel() for k in a)
    parts = [f"DIFFERENT: {same / total:.1%} of entries equal"]
    if len(first["errors"]) == len(second["errors"]) and first["errors"]:
        gap = max(abs(x - y) for x, y in zip(first["errors"], second["errors"]))
        parts.append(f"largest |Δ rel. error| {gap:.2e}")
    if "top1" in first:
        parts.append(f"top-1 {first['top1']:.4f} vs {second['top1']:.4f}")
    return ", ".join(parts)


def parse_environment(text: str) -> dict:
    pairs = [item.split("=", 1) for item in shlex.split(text)]
    if any(len(pair) != 2 for pair in pairs):
        raise SystemExit(f"error: --environments takes 'NAME=value …' strings, got {text!r}")
    return dict(pairs)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="configurations: " + "; ".join(CONFIGURATIONS))
    parser.add_argument("--against", metavar="REV", help="the revision to compare with (e.g. main, HEAD~1)")
    parser.add_argument("--revision", metavar="REV",
                        help="the other side, or with --environments the one revision (default: this working tree)")
    parser.add_argument("--environments", nargs="+", metavar="'NAME=value …'",
                        help="compare the working tree under these settings instead ('' = as it is)")
    parser.add_argument("--only", nargs="+", choices=CONFIGURATIONS, metavar="NAME",
                        help="run these configurations only (default: all)")
    parser.add_argument("--json", metavar="PATH", help="also write every side's results here")
    args = parser.parse_args(argv)
    if (args.against is None) == (args.environments is None):
        parser.error("give --against REV or --environments")
    names = list(args.only or CONFIGURATIONS)
    with tempfile.TemporaryDirectory(prefix="check_identity_") as temporary:
        temporary = Path(temporary)
        if args.against is not None:
            sides = [(args.against, source_of(args.against, temporary / "a" / "src"), {}),
                     (args.revision or "working tree", source_of(args.revision, temporary / "b" / "src"), {})]
        else:
            root = source_of(args.revision, temporary / "src")
            sides = [(text or "as it is", root, parse_environment(text)) for text in args.environments]
        results = []
        for i, (label, root, env) in enumerate(sides):
            results.append(run_side(label, root, env, names, temporary / f"side{i}"))
            if args.json:  # after every side, so that a long comparison loses nothing
                Path(args.json).write_text(json.dumps({label: r for (label, _, _), r in zip(sides, results)},
                                                      indent=1))
        print(f"\n{' vs '.join(label for label, _, _ in sides)} (one thread, "
              f"this machine; bit identity holds for the same machine, build and thread count)")
        verdicts = {}
        for name in names:
            verdicts[name] = [compare(results[0][name], other[name]) for other in results[1:]]
            print(f"  {name:36s} " + " | ".join(verdicts[name]))
    return 0 if all(v == "equal" for row in verdicts.values() for v in row) else 1


if __name__ == "__main__":
    if len(sys.argv) > 3 and sys.argv[1] == "--worker":
        root, output = Path(sys.argv[2]), Path(sys.argv[3])
        output.write_text(json.dumps(worker(sys.argv[4:], root, output.parent)))
    else:
        sys.exit(main())
