"""The LLM engine: paged KV cache, continuous batching, sampling. Knows nothing of Triton."""
