"""triton-vlm: serve LLaVA-style VLMs on Triton."""
