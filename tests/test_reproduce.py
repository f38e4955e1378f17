"""experiments/reproduce.py: the paper's rows, the commands, the cost model, the comparison, one real run."""
import csv
import importlib.util
import shlex
import subprocess
import sys

import pytest

from conftest import python_env, script_header
from gpfq.runner.header import parse_overrides
from gpfq.runner.logs import PLAIN_COLUMNS
from gpfq.paths import REPO_ROOT

SCRIPT = REPO_ROOT / "experiments" / "reproduce.py"
PAPER = REPO_ROOT / "experiments" / "paper_results.csv"


def load():
    spec = importlib.util.spec_from_file_location("reproduce", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(*args, cwd=None):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          env=python_env(), cwd=cwd, timeout=600)


def paper_rows():
    with open(PAPER, newline="") as f:
        return list(csv.DictReader(f))


def test_paper_csv_carries_the_logged_numbers():
    rows = {r["id"]: r for r in paper_rows()}
    assert len(rows) == 46  # 7·3 + 2·3 plain, 1 B7, 1 sweep point, 4·3 bias correction, 2 float ends, 3 of ours
    r = rows["plain-resnet50-m512-b3"]
    assert (r["scalar_C"], r["logged_top1"], r["logged_top5"], r["float_top1"]) == ("1.81", "68.51", "89.18", "76.13")
    assert rows["adhoc_bias-resnet18-m2048-b5"]["logged_top1"] == "69.18"
    assert rows["adhoc_bias-resnet18-m2048-b5"]["seed"] == "1"
    assert rows["adhoc_float_ends-resnet18-m2048-b4"]["logged_top1"] == "68.70"
    assert (rows["batch_sweep-resnet18-m32-b4"]["m"], rows["batch_sweep-resnet18-m32-b4"]["logged_top1"]) == ("32", "19.52")
    assert rows["plain_4to6-mobilenet_v2-m2048-b6"]["logged_top5"] == "89.85"
    assert all(r["source"] and r["note"] for r in rows.values())
    ours = [r for r in rows.values() if r["table"] == "ours_vgg16_m2048"]  # VGG-16 at m 2048: not in the paper
    assert [(r["model"], r["m"], r["bits"], r["logged_top1"]) for r in ours] == [("vgg16", "2048", b, "") for b in "345"]
    assert all(r["source"].startswith("ours: not in the paper") for r in ours)


def test_list_prints_every_row():
    result = run("--list")  # a subprocess once: the script runs as a user calls it
    assert result.returncode == 0, result.stderr
    for row in paper_rows():
        assert row["id"] in result.stdout


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    reproduce = load()
    for args in (["--row", "no-such-row", "--dry-run"], ["--table", "nope", "--list"],
                 ["--row", "plain-vgg16-m512-b4", "--data_dir", str(tmp_path)]):  # no ImageNet there
        assert reproduce.main(args) == 2, args
        err = capsys.readouterr().err
        assert err.strip().count("\n") == 0 and err.startswith("error: ")
    assert "ImageNet" in err


def dry_run_commands(capsys, *args):
    assert load().main(["--dry-run", "--no_estimate", "--data_dir", "/data", *args]) == 0
    return [shlex.split(line) for line in capsys.readouterr().out.splitlines() if "quantize.py" in line]


def test_dry_run_commands_parse_in_their_scripts(capsys):
    """Each command's flags are the script's header keys, and give the row's hyperparameters."""
    commands = dry_run_commands(capsys)
    rows = paper_rows()
    assert len(commands) == len({(r["variant"], r["model"], r["m"], r["options"], r["seed"]) for r in rows})
    covered = set()
    for argv in commands:
        variant = argv[1].split("/")[-2]
        config = parse_overrides(script_header(variant), argv[2:])  # exits on an unknown flag
        assert config["dataset"] == "imagenet" and config["data_dir"] == "/data" and config["resume"] is True
        assert config["calibration"] == "fresh"  # the paper's procedure unless asked otherwise
        bits = config["bits"] if isinstance(config["bits"], list) else [config["bits"]]
        for row in rows:
            if (row["variant"], row["model"], int(row["m"])) == (variant, config["model_name"], config["batch_size"]) \
                    and int(row["bits"]) in bits and int(row["seed"]) == config["seed"] \
                    and (variant == "quantization_scripts" or config["bias_correction"] ==
                         (None if "bias_correction=None" in row["options"] else "last")):
                assert config["cnn_scalar"] == config["mlp_scalar"] == float(row["scalar_C"])
                covered.add(row["id"])
    assert covered == {r["id"] for r in rows}


def test_calibration_fixed_reaches_every_command(capsys):
    commands = dry_run_commands(capsys, "--calibration", "fixed", "--table", "plain", "adhoc_bias")
    assert commands and all(parse_overrides(script_header(argv[1].split("/")[-2]), argv[2:])["calibration"] == "fixed"
                            for argv in commands)


def fake_probe(layers, t_img=1e-3):
    return dict(t_img=t_img, layers=layers, c_rows=0.0, c0=0.0, model_bytes=1000)


def test_cost_model_scales_as_stated():
    reproduce = load()
    machine = dict(rates={"residual": 1e9, "gram": 1e9}, t_dec=0.0, startup=0.0)
    layer = dict(kind="linear", n0=64, n1=32, groups=1, patches=1, macs=64 * 32, activation=64)
    shallow = fake_probe([layer] * 4)
    deep = fake_probe([layer] * 8, t_img=2e-3)  # twice the layers, each image twice as long to run
    cost = lambda probe, m, **kw: reproduce.point_cost(probe, machine, m, dataset="fashion_mnist", n_eval=1,
                                                        **dict(dict(engine="residual"), **kw))
    a, b, c = cost(shallow, 128), cost(deep, 128), cost(shallow, 512)
    # fresh forwards: 2·m·t_img·Σ f_i, f_i = i/L for equal layers: (L+1)/2 → m·t_img·(L+1)
    assert a["forwards"] == pytest.approx(128 * 1e-3 * 5)
    assert b["forwards"] == pytest.approx(128 * 2e-3 * 9)  # ~ depth²
    assert c["forwards"] == pytest.approx(4 * a["forwards"])  # linear in m
    # residual rule: rows·N0·(3·N1 + 2·B) per layer, B = min(block, N0); linear in m
    assert c["rule"] == pytest.approx(4 * a["rule"])
    assert a["rule"] > 4 * 128 * 64 * 3 * 32 / 1e9
    # memory: X and X̃ rows of the largest layer in float32, flat in m under the Gram form
    assert c["memory"] - a["memory"] == pytest.approx(2 * (512 - 128) * 64 * 4 + 3 * (256 - 128) * 64 * 4)
    g1, g2 = cost(shallow, 128, engine="gram"), cost(shallow, 4096, engine="gram")
    held = lambda m: 2 * 64 * 64 * 8 + 2 * min(m, 256) * 64 * 4 + 3 * min(m, 256) * 64 * 4
    assert g2["memory"] - g1["memory"] == pytest.approx(held(4096) - held(128))
    # an evaluation batch of 256 images (3 activations each) outweighs 2·128 rows + 3 of 128 images' activations
    full_eval = reproduce.point_cost(shallow, machine, 128, engine="residual", dataset="fashion_mnist")
    assert full_eval["memory"] - a["memory"] == pytest.approx(3 * 256 * 64 * 4 - (2 * 128 + 3 * 128) * 64 * 4)
    # fixed calibration: one pass of m images through both networks (linear in depth), all m images held
    f_shallow, f_deep = cost(shallow, 128, calibration="fixed"), cost(deep, 128, calibration="fixed")
    assert f_shallow["forwards"] == pytest.approx(2 * 128 * 1e-3) and f_deep["forwards"] == pytest.approx(2 * 128 * 2e-3)
    assert f_shallow["memory"] - a["memory"] == pytest.approx(2 * 2 * 128 * 64 * 4 - 3 * 128 * 64 * 4)
    assert reproduce.speedup(1) == 1 and reproduce.speedup(5) == pytest.approx(1 + 4 * reproduce.PARALLEL_EFFICIENCY)
    assert reproduce.makespan([3, 2, 2, 1], 2) == 4


def test_plan_fits_jobs_to_memory():
    reproduce = load()
    units = [[{}]] * 8
    jobs, threads, reason = reproduce.plan(units, [dict(memory=10 * 2 ** 30)] * 8, 32, 8, 50 * 2 ** 30)
    assert (jobs, threads) == (4, 8) and "GiB" in reason
    assert reproduce.plan(units, [dict(memory=2 ** 30)] * 8, 32, 4, 50 * 2 ** 30) == (4, 8, "")


def test_compare_gives_the_deltas_of_a_logged_row(tmp_path):
    reproduce = load()
    row = next(r for r in paper_rows() if r["id"] == "plain-resnet18-m1024-b4")
    logged = {c: "" for c in PLAIN_COLUMNS}
    logged.update({"Model Name": "resnet18", "Dataset": "imagenet", "Quantization Batch Size": "1024", "Bits": "4",
                   "MLP_Alphabet_Scalar": "1.16", "CNN_Alphabet_Scalar": "1.16", "Seed": "0",
                   "Quantized Top1 Accuracy": "0.6801", "Quantized Top5 Accuracy": "0.8790"})
    other = dict(logged, Bits="3", **{"Quantized Top1 Accuracy": "0.1"})
    with open(tmp_path / "Quantization_Log.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, PLAIN_COLUMNS)
        writer.writeheader()
        writer.writerows([other, logged])
    [line] = reproduce.compare([row], tmp_path)
    assert line["ours_top1"] == 68.01 and line["delta_top1"] == pytest.approx(68.01 - 67.70)
    assert line["delta_top5"] == pytest.approx(87.90 - 88.09)
    table = reproduce.markdown([line])
    assert "| 67.7 | 68.01 | +0.31 |" in table and "-0.19" in table
    assert reproduce.compare([row], tmp_path, calibration="fixed")[0]["ours_top1"] is None  # logged as fresh
    [missing] = reproduce.compare([dict(row, bits="5")], tmp_path)
    assert missing["ours_top1"] is None and "–" in reproduce.markdown([missing])


@pytest.mark.slow
def test_end_to_end_one_tiny_row(tmp_path):
    """A one-row table on Fashion-MNIST: the script runs, its row is matched, the side-by-side table printed."""
    fields = paper_rows()[0].keys()
    tiny = dict.fromkeys(fields, "")
    tiny.update(id="tiny", table="tiny", variant="quantization_scripts", model="fashion_resnet",
                dataset="fashion_mnist", bits="4", scalar_C="1.3", m="64", percentile="1.0", retain_rate="0.25",
                seed="0", options="alphabet=gpfq2022", logged_top1="90.00", logged_top5="99.00", source="test")
    with open(tmp_path / "tiny.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        writer.writerow(tiny)
    result = run("--paper_csv", str(tmp_path / "tiny.csv"), "--log_dir", str(tmp_path / "logs"), "--out",
                 str(tmp_path / "out"), "--no_estimate")
    assert result.returncode == 0, result.stderr[-2000:]
    [logged] = list(csv.DictReader(open(tmp_path / "logs" / "Quantization_Log.csv")))
    ours = round(100 * float(logged["Quantized Top1 Accuracy"]), 2)
    assert f"| tiny | fashion_resnet | 4 | 64 | 1.3 | 90.0 | {ours} | {ours - 90:+.2f} |" in result.stdout
    assert (tmp_path / "out" / "reproduce.md").read_text() in result.stdout
    assert (tmp_path / "out" / "reproduce.png").stat().st_size > 0


def write_mini_imagenet(root):
    """ILSVRC2012/train and val in class folders: 3 wnids, 4 train and 2 val JPEGs each (random pixels)."""
    import numpy as np
    from PIL import Image
    for c, wnid in enumerate(["n01440764", "n01443537", "n01484850"]):
        for split, n in (("train", 4), ("val", 2)):
            for i in range(n):
                path = root / "ILSVRC2012" / split / wnid / f"{wnid}_{split}_{i}.JPEG"
                path.parent.mkdir(parents=True, exist_ok=True)
                pixels = np.random.default_rng(100 * c + 10 * i + len(split)).integers(0, 255, (240, 260, 3))
                Image.fromarray(pixels.astype(np.uint8)).save(path, "JPEG")


@pytest.mark.slow
def test_end_to_end_paper_row_random_weights_synthetic_imagenet(tmp_path):
    """A paper row (ResNet-18, 4 bits) at m 4 on a synthetic ImageNet with random weights: the command carries
    --weights random and --eval_subset, the row is matched with the same weights and subset only, and the table
    shows ours beside the logged 67.70 with the delta."""
    write_mini_imagenet(tmp_path / "data")
    rows = paper_rows()
    row = dict(next(r for r in rows if r["id"] == "plain-resnet18-m1024-b4"), m="4")
    with open(tmp_path / "one.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, rows[0].keys())
        writer.writeheader()
        writer.writerow(row)
    args = ["--paper_csv", str(tmp_path / "one.csv"), "--log_dir", str(tmp_path / "logs"), "--out", str(tmp_path / "out"),
            "--data_dir", str(tmp_path / "data"), "--weights", "random", "--eval_subset", "6", "--no_estimate"]
    result = run(*args, "--cores", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    [logged] = list(csv.DictReader(open(tmp_path / "logs" / "Quantization_Log.csv")))
    assert (logged["Weights"], logged["Eval Subset"], logged["Calibration"], logged["Model Name"]) == (
        "random", "6", "fresh", "resnet18")
    ours = round(100 * float(logged["Quantized Top1 Accuracy"]), 2)
    assert f"| plain-resnet18-m1024-b4 | resnet18 | 4 | 4 | 1.16 | 67.7 | {ours} | {ours - 67.70:+.2f} |" in result.stdout
    # the same log read for the pretrained weights or the whole set: nothing of ours to show
    assert load().compare([row], tmp_path / "logs")[0]["ours_top1"] is None
    assert load().compare([row], tmp_path / "logs", weights="random", eval_subset=6)[0]["ours_top1"] == ours
