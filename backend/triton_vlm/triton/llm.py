"""Triton adapter for the `llm` model: a decoupled Python-backend model around LLMEngine.

execute() validates each request and hands it to the engine's loop thread, then returns at
once; the loop streams each step's new token ids back through the request's response sender.

Should the loop thread ever die, every request gets an error naming the cause, `is_ready` turns
false (Tritons that ask it) and the stub exits shortly after, so that Triton 2.51 too sees the
model unhealthy and `triton-vlm serve` reloads it.
"""
from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import fields

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from ..engine.config import EngineConfig
from ..engine.llm_engine import EngineBusy, EngineDead, EngineStats, LLMEngine, RequestOutput
from ..engine.sampling_params import SamplingParams
from .params import error_response, flag, model_parameters, optional_input, scalar

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
EXIT_AFTER_DEATH_S = 2.0  # time for the error responses to leave before the stub exits
# Triton 2.51's stub is not safe for concurrent pb_utils calls (see triton/vlm.py): the engine
# thread and execute() both send, so every call on a request or its sender holds this lock.
PB_LOCK = threading.RLock()


class TritonPythonModel:
    def initialize(self, args):
        params = model_parameters(args)
        config = engine_config(params)
        # Half the cores by default: the vlm and vision_encoder stubs work on this host too.
        torch.set_num_threads(int(params.get("torch_threads") or max(1, (os.cpu_count() or 2) // 2)))
        self.engine = LLMEngine(params["checkpoint"], config)
        self._families, metrics = _gauges()
        self._gauges = Gauges(metrics) if metrics else None
        if self._gauges:
            self.engine.on_step = self._gauges.publish
            self.engine.on_step(self.engine.stats())
        self.engine.on_death = _exit_soon
        self.engine.start()
        pb_utils.Logger.log_info(f"llm: {self.engine.runner.num_blocks} KV blocks of {config.block_size} tokens "
                                 f"on {self.engine.runner.device} ({self.engine.runner.dtype})")

    def execute(self, requests):
        for request in requests:
            with PB_LOCK:
                self._execute_one(request)
        return None

    def _execute_one(self, request) -> None:
        sender = request.get_response_sender()
        try:
            self._execute(request, sender)
        except ValueError as e:
            sender.send(error_response(pb_utils, str(e), pb_utils.TritonError.INVALID_ARG), flags=FINAL)
        except EngineBusy as e:
            sender.send(error_response(pb_utils, str(e), pb_utils.TritonError.UNAVAILABLE), flags=FINAL)
        except EngineDead as e:
            sender.send(error_response(pb_utils, f"llm engine stopped: {e}", pb_utils.TritonError.UNAVAILABLE),
                        flags=FINAL)
        except Exception as e:  # noqa: BLE001  (one bad request must not fail the others in the batch)
            pb_utils.Logger.log_error(f"llm: request failed: {e!r}")
            sender.send(error_response(pb_utils, f"internal error: {e}", pb_utils.TritonError.INTERNAL), flags=FINAL)

    def _execute(self, request, sender) -> None:
        if flag(pb_utils, request, "ping"):  # vlm asks whether we still serve
            if not self.engine.alive:
                raise EngineDead(self.engine.dead_reason)
            sender.send(flags=FINAL)
        elif flag(pb_utils, request, "abort"):
            # BLS callers cannot cancel a stream in this Triton; they abort by request id instead.
            self.engine.abort(request.request_id())
            sender.send(flags=FINAL)
        else:
            self.engine.add(self._sequence(request), _streamer(sender), is_cancelled=_locked(sender.is_cancelled))

    def is_ready(self) -> bool:
        """Asked by Tritons whose Python backend supports it (newer than 2.51)."""
        return self.engine.alive

    def _sequence(self, request):
        ids = optional_input(pb_utils, request, "input_ids")
        if ids is None:
            raise ValueError("input_ids: required")
        embeds = optional_input(pb_utils, request, "image_embeds")
        if embeds is not None:
            embeds = torch.tensor(embeds.reshape(-1, embeds.shape[-1]), dtype=torch.float32)  # copy out of shm
        positions = optional_input(pb_utils, request, "position_ids")
        if positions is not None:
            positions = torch.tensor(positions, dtype=torch.long)  # copy out of shm
        raw = scalar(optional_input(pb_utils, request, "sampling_parameters"), "sampling_parameters")
        params = SamplingParams.from_json(raw)
        # The caller's id, when given, is what `abort` names; engine ids stay unique either way.
        request_id = request.request_id() or self.engine.new_request_id()
        return self.engine.make_sequence(request_id, ids.reshape(-1).tolist(), params, embeds, positions)

    def finalize(self):
        self.engine.on_step = None
        self.engine.stop()
        # Drop the metrics while the stub can still tell the server: freed at interpreter exit
        # instead, they segfaulted it (Metric::SaveToSharedMemory) and stalled the shutdown.
        with PB_LOCK:
            self._gauges = self._families = None


def engine_config(params: dict[str, str]) -> EngineConfig:
    """EngineConfig from config.pbtxt string parameters, each cast to its field's type."""
    defaults = EngineConfig()
    return EngineConfig(**{f.name: type(getattr(defaults, f.name))(params[f.name])
                           for f in fields(EngineConfig) if params.get(f.name, "") != ""})


def _exit_soon(reason: str) -> None:
    """The engine loop died: leave, so Triton marks this stub unhealthy and the supervisor reloads it."""
    pb_utils.Logger.log_error(f"llm: engine loop died ({reason}); the stub exits in {EXIT_AFTER_DEATH_S:g} s")
    threading.Timer(EXIT_AFTER_DEATH_S, os._exit, args=(1,)).start()


class Gauges:
    """The engine's gauges, set from its loop thread after steps.

    Each Metric.set is a round trip to the server during which Triton 2.51's stub keeps the GIL,
    so the whole stub waits on it: a value is set only when it changed, at most every PUBLISH_S,
    and always once the engine is idle (so a drained engine reads 0 at once).
    """

    PUBLISH_S = 0.1

    def __init__(self, metrics: list):
        self.metrics = metrics
        self.shown: list[float | None] = [None] * len(metrics)
        self.published_at = 0.0

    def publish(self, stats: EngineStats) -> None:
        now = time.monotonic()
        idle = stats.num_running == 0 and stats.num_waiting == 0
        if not idle and now - self.published_at < self.PUBLISH_S:
            return
        self.published_at = now
        with PB_LOCK:  # a Metric.set racing another pb_utils call segfaulted the stub
            for i, (metric, value) in enumerate(zip(self.metrics, stats)):
                if self.shown[i] != value:
                    metric.set(value)
                    self.shown[i] = value


def _gauges():
    """Prometheus gauges on Triton's metrics port, in EngineStats order; none if metrics are off."""
    names = [("kv_blocks_used", "KV cache blocks in use"), ("kv_blocks_total", "KV cache blocks in the pool"),
             ("requests_running", "requests in the running batch"), ("requests_waiting", "requests queued"),
             ("preemptions", "sequences preempted so far")]
    # A family must outlive its metrics, so both are kept.
    try:
        families = [pb_utils.MetricFamily(name=f"triton_vlm_{n}", description=d, kind=pb_utils.MetricFamily.GAUGE)
                    for n, d in names]
        return families, [f.Metric(labels={"model": "llm"}) for f in families]
    except Exception as e:  # noqa: BLE001  (--allow-metrics=false: serve without gauges)
        pb_utils.Logger.log_warn(f"llm: engine gauges not exported ({e})")
        return [], []


def output_arrays(out: RequestOutput) -> dict[str, np.ndarray]:
    """One completion's news as llm output tensors (plain numpy, built outside PB_LOCK's concerns)."""
    arrays = {"output_ids": np.asarray(out.new_token_ids, dtype=np.int64),
              "index": np.array([out.index], dtype=np.uint32),
              "text_output": np.array([out.text.encode()], dtype=object),
              "cumulative_logprob": np.array([out.cumulative_logprob], dtype=np.float32)}
    if out.finish_reason is not None:
        arrays["finish_reason"] = np.array([out.finish_reason.encode()], dtype=object)
    if out.logprobs is not None:
        arrays["logprobs"] = np.array([logprobs_json(out.logprobs).encode()], dtype=object)
    if out.prompt_logprobs is not None:
        arrays["prompt_logprobs"] = np.array([logprobs_json(out.prompt_logprobs).encode()], dtype=object)
    return arrays


def logprobs_json(entries: list[dict | None]) -> str:
    """Triton vLLM backend's layout: per token {"<id>": {"logprob", "rank", "decoded_token"}} (or null)."""
    return json.dumps([None if entry is None else {str(t): {"logprob": lp, "rank": rank, "decoded_token": text}
                                                   for t, (lp, rank, text) in entry.items()} for entry in entries])


def _locked(fn):
    def call(*args):
        with PB_LOCK:
            return fn(*args)
    return call


def _streamer(sender):
    @_locked
    def send(out: RequestOutput) -> None:
        if out.error:
            sender.send(error_response(pb_utils, out.error, pb_utils.TritonError.INTERNAL), flags=FINAL)
            return
        tensors = [pb_utils.Tensor(name, array) for name, array in output_arrays(out).items()]
        sender.send(pb_utils.InferenceResponse(output_tensors=tensors), flags=FINAL if out.finished else 0)
    return send
