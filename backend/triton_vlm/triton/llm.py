"""Triton adapter for the `llm` model: a decoupled Python-backend model around LLMEngine.

execute() validates each request and hands it to the engine's loop thread, then returns at
once. The loop thread only computes: each step's outputs go to the response thread (triton/responder.py),
which sends them, and its stats to the metrics thread (triton/metrics.py).

Should the loop thread ever die, every request gets an error naming the cause, `is_ready` turns
false (Tritons that ask it) and the stub exits shortly after, so that Triton 2.51 too sees the
model unhealthy and `triton-vlm serve` reloads it.
"""
from __future__ import annotations

import json
import os
import threading
from dataclasses import fields

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from ..engine.config import EngineConfig
from ..engine.llm_engine import EngineBusy, EngineDead, LLMEngine, RequestOutput
from ..engine.sampling_params import SamplingParams
from ..engine.stats import IterationStats
from .aborts import AbortBoard
from .channel import Senders
from .metrics import EngineMetrics
from .params import error_response, flag, model_parameters, optional_input, scalar, text
from .responder import Responder

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
EXIT_AFTER_DEATH_S = 2.0  # time for the error responses to leave before the stub exits
# Triton 2.51's stub is not safe for concurrent pb_utils calls (see triton/vlm.py): execute(), the
# response thread and the metrics thread all make them, so every pb_utils call holds this lock.
PB_LOCK = threading.RLock()


class TritonPythonModel:
    def initialize(self, args):
        params = model_parameters(args)
        config = engine_config(params)
        if args.get("model_instance_kind") == "GPU" and config.device in ("auto", "cuda"):
            # One engine per GPU instance (build --gpus N): this stub's GPU is the one Triton gave it.
            device_id = int(args["model_instance_device_id"])
            torch.cuda.set_device(device_id)  # CUDA graphs and FlashInfer work on the current device
            config.device = f"cuda:{device_id}"
        # All cores by default (split between llm instances): measured best on an idle 2-core host even though
        # vlm and vision_encoder share them (bench serve: 2 threads gave +12% tokens/s at 16 clients and +34%
        # at 32 over 1, the same at 1).
        cores = max(1, (os.cpu_count() or 1) // instance_count(args))
        torch.set_num_threads(int(params.get("torch_threads") or cores))
        self.engine = LLMEngine(params["checkpoint"], config)
        # With several instances an abort may reach another instance than the request's.
        several = instance_count(args) > 1
        self._aborts = AbortBoard.for_model(args["model_name"]) if several else None
        self.responder = Responder(PB_LOCK, output_arrays)
        instance = args.get("model_instance_name", "llm")
        labels = {"model": args["model_name"], "version": args["model_version"]}
        if several:  # each instance is its own engine: its gauges must not overwrite the others'
            labels["model_instance"] = instance
        self.metrics = EngineMetrics(PB_LOCK, labels, instance, self.engine.scheduler.max_seq_len,
                                     config.block_size, config.max_num_seqs)
        self.engine.on_step = self.metrics.record
        self.metrics.record(self.engine.stats(), IterationStats())
        self.engine.on_death = _exit_soon
        self.channels = Senders(on_lost=self.engine.abort)  # a vlm that is gone frees its requests' blocks
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
            if self._aborts and request.request_id():
                self._aborts.post(request.request_id())
            sender.send(flags=FINAL)
        elif (reply_to := optional_input(pb_utils, request, "reply_to")) is not None:
            # vlm: outputs go to its socket (see triton/channel.py); this BLS call gets one answer, now.
            # vlm aborts by request id: with several instances, through the abort board.
            seq = self._sequence(request)
            channel = self.channels.to(text(scalar(reply_to, "reply_to"), "reply_to"))
            board = self._aborts
            self.engine.add(seq, lambda out: channel.send(output_message(out)),
                            is_cancelled=(lambda: board.posted(seq.request_id)) if board else None)
            sender.send(flags=FINAL)
        else:
            streamed = bool(scalar(optional_input(pb_utils, request, "stream"), "stream", True))
            seq = self._sequence(request)
            on_output, is_cancelled = self.responder.stream(sender, hold=not streamed)
            board = self._aborts
            self.engine.add(seq, on_output, is_cancelled=(lambda: is_cancelled() or board.posted(seq.request_id))
                            if board else is_cancelled)

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
        # Per image: its rows in image_embeds and its content hash (prefix caching keys blocks by it).
        hashes = optional_input(pb_utils, request, "image_hashes")
        rows = optional_input(pb_utils, request, "image_rows")
        # The caller's id, when given, is what `abort` names; engine ids stay unique either way.
        request_id = request.request_id() or self.engine.new_request_id()
        return self.engine.make_sequence(request_id, ids.reshape(-1).tolist(), params, embeds,
                                         None if hashes is None else [bytes(h) for h in hashes.reshape(-1)],
                                         None if rows is None else rows.reshape(-1).tolist(), positions)

    def finalize(self):
        self.engine.on_step = None
        self.engine.stop()
        self.channels.stop()
        self.responder.stop()  # after the engine: its "engine stopped" answers are queued
        self.metrics.stop()


def engine_config(params: dict[str, str]) -> EngineConfig:
    """EngineConfig from config.pbtxt string parameters, each cast to its field's type."""
    defaults = EngineConfig()
    return EngineConfig(**{f.name: type(getattr(defaults, f.name))(params[f.name])
                           for f in fields(EngineConfig) if params.get(f.name, "") != ""})


def _exit_soon(reason: str) -> None:
    """The engine loop died: leave, so Triton marks this stub unhealthy and the supervisor reloads it."""
    pb_utils.Logger.log_error(f"llm: engine loop died ({reason}); the stub exits in {EXIT_AFTER_DEATH_S:g} s")
    threading.Timer(EXIT_AFTER_DEATH_S, os._exit, args=(1,)).start()


def instance_count(args: dict) -> int:
    """How many instances of this model Triton runs: `count` per listed GPU, or `count` on CPU."""
    groups = json.loads(args["model_config"]).get("instance_group", [])
    return sum(int(g.get("count", 1)) * max(1, len(g.get("gpus") or [])) for g in groups) or 1


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


def output_message(out: RequestOutput) -> dict:
    """One completion's news as a channel message (the same fields as output_arrays)."""
    message = {"id": out.request_id, "ids": out.new_token_ids, "index": out.index, "text": out.text,
               "cumulative_logprob": out.cumulative_logprob, "finish_reason": out.finish_reason,
               "finished": out.finished}
    if out.error:
        message["error"] = out.error
    if out.logprobs is not None:
        message["logprobs"] = logprobs_entries(out.logprobs)
    if out.prompt_logprobs is not None:
        message["prompt_logprobs"] = logprobs_json(out.prompt_logprobs)
    return message


def logprobs_entries(entries: list[dict | None]) -> list:
    """Triton vLLM backend's layout: per token {"<id>": {"logprob", "rank", "decoded_token"}} (or null)."""
    return [None if entry is None else {str(t): {"logprob": lp, "rank": rank, "decoded_token": text}
                                        for t, (lp, rank, text) in entry.items()} for entry in entries]


def logprobs_json(entries: list[dict | None]) -> str:
    return json.dumps(logprobs_entries(entries))
