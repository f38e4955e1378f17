"""GPFQ: post-training quantization of neural networks with provable guarantees.

    import gpfq
    result = gpfq.quantize(model, calibration_images, gpfq.QuantConfig(bits=4))
"""
__version__ = "0.1.0"

from .api import QuantizedResult, quantize, quantize_layer  # noqa: E402
from .config import QuantConfig  # noqa: E402
from .network import LayerReport  # noqa: E402

__all__ = ["QuantConfig", "QuantizedResult", "LayerReport", "quantize", "quantize_layer", "__version__"]
