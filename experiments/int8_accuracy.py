"""Accuracy of the deployed int8 model: ONNX Runtime's top-1 of each `<stem>.int8.onnx` in a log, beside the torch
fake-quant model's top-1 the row logged, and ONNX Runtime's own `quantize_static` of the float model as the
baseline a user would reach for.

    python3 quantization_scripts/quantize.py --fold_batchnorm True --act_bits 8 --export_qdq True \\
        --method gpfq gptq msq --bits 4 --seed 0 1 2 --log_dir logs/int8
    python3 experiments/int8_accuracy.py --log_dir logs/int8 --anchor

prints one markdown row per logged act_bits run (method, bits, seed, torch top-1, ONNX Runtime top-1, gap) and, with
`--anchor`, the top-1 of `quantize_static` (QDQ, per-channel int8 weights, uint8 activations, min-max calibration
on `--anchor_images` calibration images drawn with each seed) of the float model, BatchNorm folded.
"""
import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def ort_top1(path, evaluation, batch_size: int = 500) -> float:
    """ONNX Runtime's top-1 of the ONNX model at `path` over (image, label) pairs."""
    import onnxruntime as ort
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    correct = total = 0
    for images, labels in torch.utils.data.DataLoader(evaluation, batch_size=batch_size):
        logits = session.run(None, {name: images.numpy()})[0]
        correct += int((logits.argmax(1) == labels.numpy()).sum())
        total += len(labels)
    return correct / total


def anchor_model(model_name: str, seed: int, images: int, folder: Path) -> Path:
    """ONNX Runtime's quantize_static (QDQ, per-channel int8 weights, uint8 activations, min-max) of the float
    model with BatchNorm folded, calibrated on `images` calibration images drawn with `seed`."""
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quant_pre_process,
                                          quantize_static)
    from gpfq.io.data import calibration_set
    from gpfq.io.models import load_model
    from gpfq.io.onnx_export import export_float_onnx
    from gpfq.pipeline.folding import fold_batchnorm
    from gpfq.pipeline.streams import CalibrationStream
    model, _ = fold_batchnorm(load_model(model_name))
    calibration = calibration_set("fashion_mnist")
    batch = torch.cat(CalibrationStream(calibration, seed).draw(images)).numpy()
    float_path = export_float_onnx(model, folder / f"float_{seed}.onnx", tuple(calibration[0][0].shape))
    prepared = folder / f"prepared_{seed}.onnx"
    quant_pre_process(str(float_path), str(prepared), skip_symbolic_shape=True)  # its symbolic pass fails on torch's Constant nodes

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"images": batch[i:i + 1]} for i in range(len(batch))])

        def get_next(self):
            return next(self.batches, None)
    out = folder / f"anchor_{seed}.onnx"
    quantize_static(str(prepared), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--log_dir", default="logs", help="folder of the Quantization_Log.csv to read (default logs)")
    parser.add_argument("--anchor", action="store_true", help="also ONNX Runtime's quantize_static of the float model")
    parser.add_argument("--anchor_images", type=int, default=512, help="its calibration images (default 512, m)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="the anchor's seeds (default 0 1 2)")
    args = parser.parse_args(argv)
    from gpfq.io.data import evaluation_set
    from gpfq.paths import REPO_ROOT
    from gpfq.runner.logs import PLAIN_LOG, read_rows
    log = Path(args.log_dir) / PLAIN_LOG
    if not log.is_file():
        raise SystemExit(f"error: no log at {log}: run the quantize.py command in this script's docstring first")
    evaluation = evaluation_set("fashion_mnist")
    print("| method | weights | seed | torch top-1 | ONNX Runtime int8 top-1 | gap (points) |")
    print("|---|---|---|---|---|---|")
    for row in read_rows(log):
        if row["Act Bits"] != "8" or not row["Quantized Model File"]:
            continue
        model_file = Path(row["Quantized Model File"])
        int8 = (model_file if model_file.is_absolute() else REPO_ROOT / model_file).with_suffix(".int8.onnx")
        if not int8.is_file():
            print(f"| {row['Method']} | W{row['Bits']} | {row['Seed']} | (no {int8.name}: run with --export_qdq True) |")
            continue
        deployed = ort_top1(int8, evaluation) * 100
        logged = float(row["Quantized Top1 Accuracy"]) * 100
        print(f"| {row['Method']} | W{row['Bits']}A8 | {row['Seed']} | {logged:.2f} % | {deployed:.2f} % | "
              f"{deployed - logged:+.2f} |", flush=True)
    if args.anchor:
        with tempfile.TemporaryDirectory() as folder:
            results = [ort_top1(anchor_model("fashion_resnet", seed, args.anchor_images, Path(folder)), evaluation)
                       for seed in args.seeds]
        print(f"\nONNX Runtime quantize_static W8A8 (float weights rounded by ONNX Runtime): "
              + ", ".join(f"seed {s} {r * 100:.2f} %" for s, r in zip(args.seeds, results))
              + f"; mean {np.mean(results) * 100:.2f} %")


if __name__ == "__main__":
    main()
