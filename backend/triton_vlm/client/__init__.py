"""Clients of the `vlm` model: the request protocol (gRPC streaming, HTTP generate), and on it the
interfaces vLLM users (`LLM`, `SamplingParams`) and LMDeploy users (`pipeline`, `GenerationConfig`) write."""
from .llm import LLM, CompletionOutput, RequestOutput, SamplingParams
from .pipeline import GenerationConfig, Pipeline, Response, Session, pipeline
from .protocol import (EXTRA_OUTPUTS, MODEL, Completion, VLMError, complete, complete_all, generate_grpc,
                       generate_http, grpc_inputs, stream_grpc, stream_grpc_results, stream_http)

__all__ = ["LLM", "CompletionOutput", "RequestOutput", "SamplingParams", "GenerationConfig", "Pipeline", "Response",
           "Session", "pipeline", "EXTRA_OUTPUTS", "MODEL", "Completion", "VLMError", "complete", "complete_all",
           "generate_grpc", "generate_http", "grpc_inputs", "stream_grpc", "stream_grpc_results", "stream_http"]
