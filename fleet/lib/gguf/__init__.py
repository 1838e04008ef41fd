"""GGUF small language models to onnxruntime-genai bundles, with numpy and onnx only. No Django here."""
