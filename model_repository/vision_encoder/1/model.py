"""Triton entry point for the vision encoder; the implementation lives in the triton_vlm package."""
from triton_vlm.triton.vision_encoder import TritonPythonModel  # noqa: F401
