"""Triton Python-backend models; each imports triton_python_backend_utils, so load them only inside Triton."""
