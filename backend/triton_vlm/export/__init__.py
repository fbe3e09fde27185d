"""Export the parts of a LLaVA checkpoint that Triton serves (ONNX, TensorRT)."""
