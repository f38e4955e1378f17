"""GPFQ: post-training quantization of neural networks with provable guarantees.

    import gpfq
    result = gpfq.quantize(model, calibration_images, gpfq.QuantConfig(bits=4))
"""
from gpfq.paths import __version__  # noqa: E402 (one place, beside the repository paths)

from gpfq.api import QuantizedResult, quantize, quantize_layer  # noqa: E402
from gpfq.config import QuantConfig  # noqa: E402
from gpfq.pipeline.reports import LayerReport  # noqa: E402
# the deployable model: integer codes in a safetensors file, and its ONNX export
from gpfq.io.model_file import load_quantized, read_quantized, save_quantized  # noqa: E402
from gpfq.io.onnx_export import export_onnx  # noqa: E402
from gpfq.io.qdq_export import export_qdq_onnx  # noqa: E402 (act_bits=8: a QDQ graph on int8 kernels)

__all__ = ["QuantConfig", "QuantizedResult", "LayerReport", "quantize", "quantize_layer", "save_quantized",
           "load_quantized", "read_quantized", "export_onnx", "export_qdq_onnx", "__version__"]
