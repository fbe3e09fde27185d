"""Triton adapter for the `llm` model: a decoupled Python-backend model around LLMEngine.

execute() validates each request and hands it to the engine's loop thread, then returns at
once; the loop streams each step's new token ids back through the request's response sender.
"""
from __future__ import annotations

import os
from dataclasses import fields

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from ..engine.config import EngineConfig
from ..engine.llm_engine import LLMEngine, RequestOutput
from ..engine.sampling_params import SamplingParams
from .params import error_response, model_parameters, optional_input, scalar

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonPythonModel:
    def initialize(self, args):
        params = model_parameters(args)
        config = engine_config(params)
        # Half the cores by default: the vlm and vision_encoder stubs work on this host too.
        torch.set_num_threads(int(params.get("torch_threads") or max(1, (os.cpu_count() or 2) // 2)))
        self.engine = LLMEngine(params["checkpoint"], config)
        self._families, gauges = _gauges()
        self.engine.on_step = lambda stats: [g.set(v) for g, v in zip(gauges, stats)]
        self.engine.on_step(self.engine.stats())
        self.engine.start()
        pb_utils.Logger.log_info(f"llm: {self.engine.runner.num_blocks} KV blocks of {config.block_size} tokens "
                                 f"on {self.engine.runner.device} ({self.engine.runner.dtype})")

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            if scalar(optional_input(pb_utils, request, "abort"), "abort", False):
                # BLS callers cannot cancel a stream in this Triton; they abort by request id instead.
                self.engine.abort(request.request_id())
                sender.send(flags=FINAL)
                continue
            try:
                seq = self._sequence(request)
            except ValueError as e:
                sender.send(error_response(pb_utils, str(e)), flags=FINAL)
                continue
            self.engine.add(seq, _streamer(sender), is_cancelled=sender.is_cancelled)
        return None

    def _sequence(self, request):
        ids = optional_input(pb_utils, request, "input_ids")
        if ids is None:
            raise ValueError("input_ids: required")
        embeds = optional_input(pb_utils, request, "image_embeds")
        if embeds is not None:
            embeds = torch.tensor(embeds.reshape(-1, embeds.shape[-1]), dtype=torch.float32)  # copy out of shm
        raw = scalar(optional_input(pb_utils, request, "sampling_parameters"), "sampling_parameters")
        params = SamplingParams.from_json(raw)
        # The caller's id, when given, is what `abort` names; engine ids stay unique either way.
        request_id = request.request_id() or self.engine.new_request_id()
        return self.engine.make_sequence(request_id, ids.reshape(-1).tolist(), params, embeds)

    def finalize(self):
        self.engine.stop()


def engine_config(params: dict[str, str]) -> EngineConfig:
    """EngineConfig from config.pbtxt string parameters, each cast to its field's type."""
    defaults = EngineConfig()
    return EngineConfig(**{f.name: type(getattr(defaults, f.name))(params[f.name])
                           for f in fields(EngineConfig) if params.get(f.name, "") != ""})


def _gauges():
    """Prometheus gauges on Triton's metrics port, in EngineStats order."""
    names = [("kv_blocks_used", "KV cache blocks in use"), ("kv_blocks_total", "KV cache blocks in the pool"),
             ("requests_running", "requests in the running batch"), ("requests_waiting", "requests queued"),
             ("preemptions", "sequences preempted so far")]
    # A family must outlive its metrics, so both are kept.
    families = [pb_utils.MetricFamily(name=f"triton_vlm_{n}", description=d, kind=pb_utils.MetricFamily.GAUGE)
                for n, d in names]
    return families, [f.Metric(labels={"model": "llm"}) for f in families]


def _streamer(sender):
    def send(out: RequestOutput) -> None:
        if out.error:
            sender.send(error_response(pb_utils, out.error), flags=FINAL)
            return
        tensors = [pb_utils.Tensor("output_ids", np.asarray(out.new_token_ids, dtype=np.int64))]
        if out.finished:
            tensors.append(pb_utils.Tensor("finish_reason", np.array([out.finish_reason.encode()], dtype=object)))
        sender.send(pb_utils.InferenceResponse(output_tensors=tensors), flags=FINAL if out.finished else 0)
    return send
