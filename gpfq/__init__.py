"""GPFQ: post-training quantization of neural networks with provable guarantees.

    import gpfq
    result = gpfq.quantize(model, calibration_images, gpfq.QuantConfig(bits=4))
"""
__version__ = "0.1.0"

from .api import QuantizedResult, quantize, quantize_layer  # noqa: E402
from .config import QuantConfig  # noqa: E402
from .network import LayerReport  # noqa: E402
# the deployable model: integer codes in a safetensors file, and its ONNX export
from .model_file import load_quantized, read_quantized, save_quantized  # noqa: E402
from .onnx_export import export_onnx  # noqa: E402

__all__ = ["QuantConfig", "QuantizedResult", "LayerReport", "quantize", "quantize_layer", "save_quantized",
           "load_quantized", "read_quantized", "export_onnx", "__version__"]
