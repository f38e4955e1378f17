__version__ = "0.1.0"

# the deployable model: integer codes in a safetensors file, and its ONNX export
from .model_file import load_quantized, read_quantized, save_quantized  # noqa: E402
from .onnx_export import export_onnx  # noqa: E402
