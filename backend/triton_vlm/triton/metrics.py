"""Prometheus metrics on Triton's metrics port (`pb_utils.MetricFamily`), exported from a thread of their own.

Names are those dashboards already read: Triton's vLLM backend (`vllm:*` counters and histograms, labelled
model and version), vLLM's own gauges, and TensorRT-LLM's (`nv_trt_llm_*`, which the Gateway API inference
extension and TRT-LLM dashboards scrape); plus this project's `triton_vlm_*`.

Every Metric call is a round trip to the server during which Triton 2.51's stub holds the GIL, and the stub is
not safe for concurrent pb_utils use. So the engine and request threads only record plain data (`record*`,
under a threading.Lock); a publisher thread turns it into Metric calls, at most every PUBLISH_S and under the
stub's PB_LOCK: counters once per flush with the sum, gauges only when changed, histograms one observe per
value. To add a counter: a field in engine/stats.py's IterationStats and a line in COUNTERS.
"""
from __future__ import annotations

import threading
import time

import triton_python_backend_utils as pb_utils

from ..engine.stats import EngineStats, IterationStats

PUBLISH_S = 0.1

# (name, description, IterationStats field)
COUNTERS = [
    ("vllm:prompt_tokens_total", "Number of prefill tokens processed.", "prompt_tokens"),
    ("vllm:generation_tokens_total", "Number of generation tokens processed.", "generation_tokens"),
]
# Bucket bounds as vLLM's (v1) defaults, so quantiles compare with vLLM deployments.
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0]
TPOT_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5]
LATENCY_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                   480.0, 960.0, 1920.0, 7680.0]
N_BUCKETS = [1, 2, 5, 10, 20]
IMAGE_BUCKETS = [0, 1, 2, 4, 8, 16, 32, 64]
VISION_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
FINISH_REASONS = ("stop", "length", "abort", "error")
KV_BLOCK_TYPES = ("max", "free", "used", "tokens_per", "fraction")
REQUEST_TYPES = ("waiting", "scheduled", "active", "max")


def buckets_1_2_5(limit: int) -> list[float]:
    """1, 2, 5, 10, 20, 50, ... up to limit (vLLM's build_1_2_5_buckets)."""
    out, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > limit:
                return out
            out.append(float(m * scale))
        scale *= 10


class Families:
    """Metric families and their metrics, created under the stub's lock; none when metrics are off."""

    def __init__(self, lock):
        self.lock = lock
        self._families: dict[str, object] = {}  # a family must outlive its metrics
        self.enabled = True

    def metric(self, name: str, description: str, kind, labels: dict, buckets: list[float] | None = None):
        if not self.enabled:
            return None
        with self.lock:
            try:
                family = self._families.get(name)
                if family is None:
                    family = self._families[name] = pb_utils.MetricFamily(name=name, description=description, kind=kind)
                return family.Metric(labels=labels, buckets=buckets) if buckets else family.Metric(labels=labels)
            except Exception as e:  # noqa: BLE001  (--allow-metrics=false: serve without metrics)
                pb_utils.Logger.log_warn(f"metrics not exported ({e})")
                self.enabled = False
                return None

    def release(self, owner) -> None:
        """Drop the owner's metrics, then the families, while the stub can still tell the server: freed at
        interpreter exit instead, metrics segfaulted it (Metric::SaveToSharedMemory) and stalled the shutdown.
        The owner keeps only `families` and a `publisher` of None (its record calls then do nothing)."""
        with self.lock:
            owner.__dict__ = {"families": self, "publisher": None}
            self._families = {}


class Publisher:
    """A thread that calls `flush` (under the stub's lock) after `poke`, at most every PUBLISH_S."""

    def __init__(self, lock, flush, name: str):
        self.lock, self.flush = lock, flush
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def poke(self) -> None:
        self._wake.set()

    def _loop(self) -> None:
        while not self._stopping:
            self._wake.wait()
            self._wake.clear()
            try:
                with self.lock:
                    self.flush()
            except Exception as e:  # noqa: BLE001  (metrics are not worth a request, nor the stub)
                with self.lock:
                    pb_utils.Logger.log_error(f"metrics: publishing failed: {e!r}")
            time.sleep(PUBLISH_S)

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=5)


class Gauge:
    """One gauge, set only when its value changes."""

    def __init__(self, metric):
        self.metric, self.shown = metric, None

    def set(self, value: float) -> None:
        if self.metric is not None and value != self.shown:
            self.metric.set(value)
            self.shown = value


def observe(histogram, values) -> None:
    if histogram is not None:
        for v in values:
            histogram.observe(v)


def increment(counter, value: float) -> None:
    if counter is not None and value:
        counter.increment(value)


class EngineMetrics:
    """The llm stub's metrics: vLLM's counters, histograms and gauges, TensorRT-LLM's gauges, and ours."""

    def __init__(self, lock, labels: dict, instance: str, max_model_len: int, block_size: int, max_num_seqs: int):
        self.families = f = Families(lock)
        self.block_size, self.max_num_seqs = block_size, max_num_seqs
        counter, gauge, histogram = (pb_utils.MetricFamily.COUNTER, pb_utils.MetricFamily.GAUGE,
                                     pb_utils.MetricFamily.HISTOGRAM)
        self.counters = [(f.metric(name, d, counter, labels), field) for name, d, field in COUNTERS]
        self.success = {r: f.metric("vllm:request_success_total", "Count of successfully processed requests.",
                                    counter, {**labels, "finished_reason": r}) for r in FINISH_REASONS}
        self.preemptions = f.metric("vllm:num_preemptions_total", "Cumulative number of preemption from the engine.",
                                    counter, labels)
        lengths = buckets_1_2_5(max_model_len)
        h = lambda name, d, b: f.metric(name, d, histogram, labels, b)  # noqa: E731
        self.ttft = h("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", TTFT_BUCKETS)
        self.tpot = h("vllm:time_per_output_token_seconds", "Histogram of time per output token in seconds.",
                      TPOT_BUCKETS)
        self.e2e = h("vllm:e2e_request_latency_seconds", "Histogram of end to end request latency in seconds.",
                     LATENCY_BUCKETS)
        self.queue = h("vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase for request.",
                       LATENCY_BUCKETS)
        self.prompt_len = h("vllm:request_prompt_tokens", "Number of prefill tokens processed.", lengths)
        self.generation_len = h("vllm:request_generation_tokens", "Number of generation tokens processed.", lengths)
        self.n = h("vllm:request_params_n", "Histogram of the n request parameter.", N_BUCKETS)
        g = lambda name, d, extra=None: Gauge(f.metric(name, d, gauge, {**labels, **(extra or {})}))  # noqa: E731
        self.running = g("vllm:num_requests_running", "Number of requests in model execution batches.")
        self.waiting = g("vllm:num_requests_waiting", "Number of requests waiting to be processed.")
        self.kv_usage = [g(name, "KV-cache usage. 1 means 100 percent usage.")
                         for name in ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")]
        self.kv_blocks = {t: g("nv_trt_llm_kv_cache_block_metrics", "TRT LLM KV cache block metrics",
                               {"kv_cache_block_type": t}) for t in KV_BLOCK_TYPES}
        self.requests = {t: g("nv_trt_llm_request_metrics", "TRT LLM request metrics", {"request_type": t})
                         for t in REQUEST_TYPES}
        # As before the vLLM names came (dashboards, the HPA and tests read these), per engine instance.
        ours = {"model": "llm", "model_instance": instance}
        self.ours = [Gauge(f.metric(f"triton_vlm_{n}", d, gauge, ours)) for n, d in (
            ("kv_blocks_used", "KV cache blocks in use"), ("kv_blocks_total", "KV cache blocks in the pool"),
            ("requests_running", "requests in the running batch"), ("requests_waiting", "requests queued"),
            ("preemptions", "sequences preempted so far"), ("requests_admitted", "requests admitted so far"))]
        self.prefix_cache = [f.metric(f"triton_vlm_{n}", d, counter, ours) for n, d in (
            ("prefix_cache_queries_total", "prompt tokens looked up in the prefix cache"),
            ("prefix_cache_hits_total", "prompt tokens found in the prefix cache (whole KV blocks)"))]
        self._prefix_shown = [0, 0]
        self._lock = threading.Lock()
        self._state: EngineStats | None = None
        self._pending = IterationStats()
        self._preemptions_shown = 0
        self.publisher = Publisher(lock, self._flush, "llm-metrics") if f.enabled else None

    def record(self, state: EngineStats, iteration: IterationStats) -> None:
        """From the engine thread, after each step: plain data only."""
        if self.publisher is None:
            return
        with self._lock:
            self._state = state
            self._pending.merge(iteration)
        self.publisher.poke()

    def _flush(self) -> None:
        with self._lock:
            state, it, self._pending = self._state, self._pending, IterationStats()
        for counter, field in self.counters:
            increment(counter, getattr(it, field))
        observe(self.ttft, it.ttft_s)
        observe(self.tpot, it.itl_s)
        observe(self.e2e, (r.e2e_s for r in it.finished))
        observe(self.queue, (r.queue_s for r in it.finished))
        observe(self.prompt_len, (r.prompt_tokens for r in it.finished))
        observe(self.generation_len, (r.generation_tokens for r in it.finished))
        observe(self.n, (r.n for r in it.finished))
        for r in it.finished:
            increment(self.success.get(r.finish_reason), 1)
        if state is not None:
            self._set_gauges(state)

    def _set_gauges(self, s: EngineStats) -> None:
        increment(self.preemptions, s.num_preemptions - self._preemptions_shown)
        self._preemptions_shown = s.num_preemptions
        self.running.set(s.num_running)
        self.waiting.set(s.num_waiting)
        fraction = s.kv_blocks_used / s.kv_blocks_total if s.kv_blocks_total else 0.0
        for g in self.kv_usage:
            g.set(fraction)
        for t, v in zip(KV_BLOCK_TYPES, (s.kv_blocks_total, s.kv_blocks_total - s.kv_blocks_used, s.kv_blocks_used,
                                         self.block_size, fraction)):
            self.kv_blocks[t].set(v)
        for t, v in zip(REQUEST_TYPES, (s.num_waiting, s.num_running, s.num_running + s.num_waiting,
                                        self.max_num_seqs)):
            self.requests[t].set(v)
        for g, v in zip(self.ours, s):
            g.set(v)
        for i, (counter, total) in enumerate(zip(self.prefix_cache, (s.prefix_cache_queries, s.prefix_cache_hits))):
            increment(counter, total - self._prefix_shown[i])  # the engine's totals only grow
            self._prefix_shown[i] = total

    def stop(self) -> None:
        if self.publisher is not None:
            self.publisher.stop()
        self.families.release(self)


class VLMMetrics:
    """The vlm stub's metrics: images per request, vision-encoder time, image-cache hits and misses."""

    def __init__(self, lock, labels: dict):
        self.families = f = Families(lock)
        histogram = pb_utils.MetricFamily.HISTOGRAM
        self.images = f.metric("triton_vlm_request_images", "Images per request (video frames included).",
                               histogram, labels, IMAGE_BUCKETS)
        self.vision = f.metric("triton_vlm_vision_encoder_seconds",
                               "Time of a request's vision_encoder calls, in seconds.", histogram, labels,
                               VISION_BUCKETS)
        counter = pb_utils.MetricFamily.COUNTER
        self.cache = [f.metric(f"triton_vlm_image_cache_{what}_total", f"images {how}", counter, labels)
                      for what, how in (("hits", "found in the image cache"), ("misses", "embedded afresh"))]
        self._cache_counts = [0, 0]
        self._lock = threading.Lock()
        self._images: list[int] = []
        self._vision: list[float] = []
        self.publisher = Publisher(lock, self._flush, "vlm-metrics") if f.enabled else None

    def record_request(self, images: int, vision_s: float | None, hits: int = 0, misses: int = 0) -> None:
        """From a request thread: plain data only."""
        if self.publisher is None:
            return
        with self._lock:
            self._cache_counts[0] += hits
            self._cache_counts[1] += misses
            self._images.append(images)
            if vision_s is not None:
                self._vision.append(vision_s)
        self.publisher.poke()

    def _flush(self) -> None:
        with self._lock:
            images, vision, self._images, self._vision = self._images, self._vision, [], []
            counts, self._cache_counts = self._cache_counts, [0, 0]
        for counter, n in zip(self.cache, counts):
            increment(counter, n)
        observe(self.images, images)
        observe(self.vision, vision)

    def stop(self) -> None:
        if self.publisher is not None:
            self.publisher.stop()
        self.families.release(self)
