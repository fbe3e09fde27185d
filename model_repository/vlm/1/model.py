"""Triton entry point for the vlm BLS model; the implementation lives in the triton_vlm package."""
from triton_vlm.triton.vlm import TritonPythonModel  # noqa: F401
