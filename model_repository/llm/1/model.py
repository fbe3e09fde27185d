"""Triton entry point for the decoder LLM; the implementation lives in the triton_vlm package."""
from triton_vlm.triton.llm import TritonPythonModel  # noqa: F401
