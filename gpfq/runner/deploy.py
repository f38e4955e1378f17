"""The scripts' deployable output: the quantized model file beside each saved .pt, its size columns, and
the optional ONNX export.

The .pt (a float32 state dict) stays: the ad hoc variant's `saved_model` and older tools read it. The
.safetensors beside it, same stem, is the deployable model: integer codes at ⌈log2 L⌉ bits and codebooks.
"""
import dataclasses
from pathlib import Path

from gpfq.io.model_file import SizeReport, read_quantized, save_quantized

# The log columns this module fills (all results, none identifies a grid point).
SIZE_COLUMNS = ["Levels", "Stored Bits", "Code Entropy", "Quantized File Bytes", "Size Ratio"]
FILE_COLUMN = "Quantized Model File"
# Header keys that say where results go and how the run was executed, not what the model is: left out of
# the model file, so the same run gives the same bytes (the log row and the JSON record keep them).
RUN_ONLY_KEYS = ("log_dir", "model_dir", "num_workers", "num_threads", "device", "resume", "debug", "export_onnx",
                 "export_qdq", "author", "eval_batch_size")


def model_hyperparameters(run) -> dict:
    """The keys of a point's header (`RunConfig.header`) that define the quantized model (all but RUN_ONLY_KEYS)."""
    return {key: value for key, value in run.header.items() if key not in RUN_ONLY_KEYS}


def quantized_path(model_path) -> Path:
    """The quantized model file of a saved .pt: same folder and stem, suffix .safetensors."""
    return Path(model_path).with_suffix(".safetensors")


def save_beside(model, reports, model_path, point, input_shape, log=print):
    """Write the quantized model file of `point` (a runner.run_config.Point) beside `model_path`; returns (its
    path, SizeReport), or (None, None) when a layer's alphabet is unknown (a model loaded from an old .pt without
    its .safetensors)."""
    config, run = point
    unknown = [r.name for r in reports if getattr(r, "alphabet", None) is None]
    if unknown:
        log(f"no quantized model file written: the alphabets of {unknown[:3]} are unknown (the model was loaded "
            f"from a .pt without its .safetensors)")
        return None, None
    path = quantized_path(model_path)
    size = save_quantized(model, reports, path, hyperparameters=model_hyperparameters(run), model_name=run.model_name,
                          input_shape=tuple(input_shape), fold_batchnorm=config.fold_batchnorm)
    log(f"saved {path}: {size.file_bytes} bytes, {size.ratio:.3f} of the float model's {size.float_bytes}; "
        f"{size.levels} levels, {size.stored_bits:.2f} stored bits, code entropy {size.entropy:.2f} bits per weight")
    return path, size


def size_columns(size: SizeReport) -> dict:
    """The log's size columns (empty when no quantized model file was written)."""
    if size is None:
        return dict.fromkeys(SIZE_COLUMNS, "")
    return {"Levels": size.levels, "Stored Bits": round(size.stored_bits, 4), "Code Entropy": round(size.entropy, 4),
            "Quantized File Bytes": size.file_bytes, "Size Ratio": round(size.ratio, 4)}


def with_alphabets_from(reports, quantized_file) -> list:
    """The reports with each layer's alphabet (its codebook) taken from an existing quantized model file;
    reports of layers the file does not hold as codes keep alphabet None."""
    path = Path(quantized_file)
    if not path.exists():
        return list(reports)
    codes = read_quantized(path).codes
    keys = [r.parameter or f"{r.name}.weight" for r in reports]  # the weight's parameter name (older reports: none)
    return [dataclasses.replace(r, alphabet=codes[key][1]) if key in codes else r for r, key in zip(reports, keys)]


def export_beside(quantized_file, log=print):
    """Export the quantized model file as <stem>.onnx beside it; returns the path, or None (with a message) if
    the export failed: the model and its row are already saved, so the grid goes on."""
    from gpfq.io.onnx_export import export_onnx
    path = Path(quantized_file).with_suffix(".onnx")
    try:
        kinds = export_onnx(quantized_file, path)
    except Exception as error:  # any exporter failure: report it, keep the saved results
        log(f"ONNX export of {quantized_file} failed ({type(error).__name__}: {error}); the quantized model and "
            f"its log row are saved")
        return None
    log(f"saved {path}: {path.stat().st_size} bytes ({', '.join(sorted(set(kinds.values())))})")
    if read_quantized(quantized_file).header.get("activations"):  # act_bits: the integer model too
        export_int8_beside(quantized_file, log)
    return path


def export_int8_beside(quantized_file, log=print):
    """Export an act_bits model file as <stem>.int8.onnx (QDQ: int8 weights, uint8 activations) beside it and say
    which ops ONNX Runtime runs on integer kernels and which stay float; returns the path, or None (with a
    message) if the export failed: the model and its row are already saved, so the grid goes on."""
    import warnings
    from gpfq.io.qdq_export import export_qdq_onnx, kernel_report
    path = Path(quantized_file).with_suffix(".int8.onnx")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            export_qdq_onnx(quantized_file, path)
        report = kernel_report(path)
    except Exception as error:  # any exporter failure: report it, keep the saved results
        log(f"int8 ONNX export of {quantized_file} failed ({type(error).__name__}: {error}); the quantized model "
            f"and its log row are saved")
        return None
    log(f"saved {path}: {path.stat().st_size} bytes (int8 weights, uint8 activations); {report}")
    for warning in caught:  # e.g. the saturation of 8-bit weights on a CPU without VNNI (qdq_export)
        log(str(warning.message))
    return path
