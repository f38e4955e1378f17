"""Files and data: the quantized model file (`model_file`, safetensors of integer codes) and its ONNX export
(`onnx_export`), its report (`describe`), atomic result writes (`storage`), datasets (`data`) and model
loaders (`models`, `user_models`, `state_dicts`)."""
