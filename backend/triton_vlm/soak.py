"""Soak run: mixed valid and invalid traffic against a real server, watching errors, latency and memory.

Client workers cycle through concurrency levels (phases of `phase_s` seconds) until the deadline.
Each draws a request: mostly valid toy-scene questions (0-2 images, greedy or sampled), sometimes
one of INVALID, which must get its own error while the server keeps serving. Every few seconds
the resident memory of tritonserver and of each Python-backend stub is sampled; growth is measured
from the first sample after the warm-up to one taken after the traffic has stopped.
"""
from __future__ import annotations

import contextlib
import json
import queue
import random
import re
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import numpy as np
import psutil

from triton_vlm import client
from triton_vlm.toy.evaluate import png_bytes
from triton_vlm.toy.scenes import sample_example

PROTOCOLS = ("grpc_stream", "grpc", "http", "http_stream")
STREAMING = ("grpc_stream", "http_stream")
# Invalid request kind -> the error kinds (see error_kind) that count as its correct answer.
INVALID = {
    "bad_image": ("image[0]",),
    "image_count": ("image",),
    "bad_json": ("sampling_parameters",),
    "unknown_key": ("sampling_parameters.temprature",),
    "nan_temperature": ("sampling_parameters.temperature",),
    "huge_prompt": ("input_ids", "text_input"),  # refused by llm, or earlier by vlm's own limit
    "cancel": ("cancelled",),  # the client cancels mid-stream
}
LOCAL_HOSTS = ("127.0.0.1", "localhost")


@dataclass
class SoakConfig:
    duration_s: float = 600.0
    concurrencies: tuple[int, ...] = (1, 4, 16)
    phase_s: float = 20.0  # time at one concurrency level before moving to the next
    warmup_s: float | None = None  # None: 10% of the run, but at least one full cycle of levels
    invalid_fraction: float = 0.3
    invalid_kinds: tuple[str, ...] = tuple(INVALID)
    protocols: tuple[str, ...] = PROTOCOLS
    timeout_s: float = 30.0  # per client call; a call that takes longer counts as kind "timeout"
    image_size: int = 48  # the toy model's; other checkpoints' processors resize
    max_rss_growth_pct: float = 5.0
    rss_every_s: float = 5.0
    drain_timeout_s: float = 30.0  # how long the engine may take to go idle after the traffic
    grpc_reuse: bool = False  # each gRPC worker keeps one connection (as real clients do); else one per request
    seed: int = 0

    def warmup(self) -> float:
        if self.warmup_s is not None:
            return self.warmup_s
        return min(max(0.1 * self.duration_s, self.phase_s * len(self.concurrencies)), self.duration_s / 2)


class Endpoints(NamedTuple):
    grpc_url: str
    http_url: str
    metrics_url: str | None  # None: the engine-drain check is skipped
    server_pid: int | None  # None: RSS is not measured

    @classmethod
    def of(cls, server) -> "Endpoints":
        """The endpoints of a triton_vlm.server.TritonServer."""
        return cls(server.grpc_url, server.http_url, server.metrics_url, server.proc.pid)


class Request(NamedTuple):
    kind: str  # "valid" or a key of INVALID
    protocol: str
    prompt: str
    images: list[bytes]
    sampling: str  # JSON text, sent verbatim over gRPC
    answer: str | None  # the toy scene's answer, when greedy and long enough to check


class Outcome(NamedTuple):
    kind: str
    protocol: str
    concurrency: int
    error: str | None  # error kind, None when the call succeeded
    message: str  # the error message, or the text received
    latency_s: float
    ttft_s: float | None  # first text piece of a streamed answer
    correct: bool | None  # whether the answer matches the scene's, for requests that can be checked

    @property
    def valid(self) -> bool:
        return self.kind == "valid"

    @property
    def as_expected(self) -> bool:
        return self.error is None if self.valid else self.error in INVALID[self.kind]


class RssSample(NamedTuple):
    elapsed_s: float
    processes: dict[str, tuple[int, int]]  # name -> (pid, rss bytes)


class SoakResult(NamedTuple):
    config: SoakConfig
    outcomes: list[Outcome]
    rss: list[RssSample]
    drained: bool | None  # engine idle (no running or waiting requests, no KV blocks) after the run
    notes: list[str]


# ---- requests ---------------------------------------------------------------------------------

def chat(question: str, n_images: int) -> str:
    return "USER: " + "<image>\n" * n_images + question + "\nASSISTANT:"


def valid_request(rng: random.Random, protocol: str, image_size: int) -> Request:
    examples = [sample_example(rng, image_size) for _ in range(rng.choice((0, 1, 1, 2)))]
    question = examples[0].question if examples else "Describe the image."
    max_tokens = rng.randint(1, 32)
    if rng.random() < 0.5:
        sampling = {"max_tokens": max_tokens, "temperature": 0}
    else:
        sampling = {"max_tokens": max_tokens, "temperature": rng.choice((0.5, 1.0)), "top_p": 0.9, "top_k": 20}
        if rng.random() < 0.5:
            sampling["seed"] = rng.randrange(1 << 31)
    # Only one-image greedy answers with room for the whole answer can be checked against the scene.
    answer = examples[0].answer if len(examples) == 1 and sampling["temperature"] == 0 and max_tokens >= 16 else None
    return Request("valid", protocol, chat(question, len(examples)), [png_bytes(e.image) for e in examples],
                   json.dumps(sampling), answer)


def invalid_request(rng: random.Random, kind: str, protocol: str, image_size: int) -> Request:
    image = png_bytes(sample_example(rng, image_size).image)
    prompt, images, sampling = chat("What colour is the circle?", 1), [image], {"max_tokens": 8, "temperature": 0}
    text = None
    if kind == "bad_image":
        images = [b"not an image " + rng.randbytes(16)]
    elif kind == "image_count":
        n_placeholders, n_images = rng.choice(((1, 0), (1, 2), (2, 1)))
        prompt, images = chat("What colour is the circle?", n_placeholders), [image] * n_images
    elif kind == "bad_json":
        text = '{"max_tokens": 8,'
    elif kind == "unknown_key":
        sampling = {"max_tokens": 8, "temprature": 0.5}
    elif kind == "nan_temperature":
        text = '{"max_tokens": 8, "temperature": NaN}'
    elif kind == "huge_prompt":
        prompt, images = chat("word " * 5000, 0), []
    elif kind == "cancel":  # long enough that it cannot finish before the client cancels it
        sampling = {"max_tokens": 200, "ignore_eos": True, "temperature": 0}
    else:
        raise ValueError(f"unknown invalid request kind {kind!r}")
    return Request(kind, protocol, prompt, images, text or json.dumps(sampling), None)


def draw_request(rng: random.Random, cfg: SoakConfig) -> Request:
    if rng.random() >= cfg.invalid_fraction:
        return valid_request(rng, rng.choice(cfg.protocols), cfg.image_size)
    kind = rng.choice(cfg.invalid_kinds)
    protocols = [p for p in cfg.protocols if p in STREAMING] if kind == "cancel" else cfg.protocols
    return invalid_request(rng, kind, rng.choice(protocols), cfg.image_size)


# ---- calls ------------------------------------------------------------------------------------

class CallTimeout(Exception):
    pass


def grpc_pieces(url: str, req: Request, stream: bool, timeout: float, connection=None) -> Iterator[str]:
    """Text pieces of one request over the gRPC stream API, bounded by `timeout` in total.

    Unlike client.stream_grpc_results, an unfinished stream is closed with cancel_requests=True:
    a plain stop_stream() waits for the server to finish, forever if it hangs. `connection`: a
    worker's own InferenceServerClient, kept open; without it, one is opened and closed for this request.
    """
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    inputs = client.grpc_inputs(req.prompt, req.images, stream, None)
    sampling = grpcclient.InferInput("sampling_parameters", [1], "BYTES")
    sampling.set_data_from_numpy(np.array([req.sampling.encode()], dtype=object))
    results: queue.Queue = queue.Queue()
    grpc = connection or grpcclient.InferenceServerClient(url)
    grpc.start_stream(callback=lambda result, error: results.put((result, error)), stream_timeout=timeout)
    finished = False
    try:
        try:
            grpc.async_stream_infer(client.MODEL, inputs + [sampling], request_id=uuid.uuid4().hex,
                                    enable_empty_final_response=True)
        except InferenceServerException as e:  # the stream already broke; its callback got the reason
            with contextlib.suppress(queue.Empty):
                e = results.get(timeout=1.0)[1] or e
            raise client.VLMError(str(e)) from None
        deadline = time.monotonic() + timeout
        while True:
            try:
                result, error = results.get(timeout=max(0.0, deadline - time.monotonic()) + 1.0)
            except queue.Empty:
                raise CallTimeout(f"no response within {timeout:g} s") from None
            if error is not None:
                raise client.VLMError(str(error))
            out = result.as_numpy("text_output")
            for piece in [] if out is None else out.reshape(-1):
                yield piece.decode()
            if result.get_response().parameters["triton_final_response"].bool_param:
                finished = True
                return
    finally:
        grpc.stop_stream(cancel_requests=not finished)
        if connection is None:
            grpc.close()


def http_pieces(url: str, req: Request, stream: bool, timeout: float) -> Iterator[str]:
    """Text pieces over HTTP generate / generate_stream, through the client helpers.

    Those take a dict; text that is not JSON travels as a JSON string, which the server refuses
    just the same (`sampling_parameters: expected a JSON object`).
    """
    try:
        sampling = json.loads(req.sampling)
    except ValueError:
        sampling = req.sampling
    if not stream:
        yield client.generate_http(url, req.prompt, req.images, sampling, timeout=timeout)
        return
    deadline = time.monotonic() + timeout  # urllib's timeout bounds each read, not the whole stream
    for piece in client.stream_http(url, req.prompt, req.images, sampling, timeout=timeout):
        yield piece
        if time.monotonic() > deadline:
            raise CallTimeout(f"stream still going after {timeout:g} s")


def pieces(endpoints: Endpoints, req: Request, timeout: float, connection=None) -> Iterator[str]:
    if req.protocol.startswith("grpc"):
        return grpc_pieces(endpoints.grpc_url, req, req.protocol == "grpc_stream", timeout, connection)
    return http_pieces(endpoints.http_url, req, req.protocol == "http_stream", timeout)


def server_message(error: str) -> str:
    """The server's own words: without gRPC's status prefix or the SSE framing of generate_stream errors."""
    error = error.strip()
    if error.startswith("data:"):
        with contextlib.suppress(ValueError, KeyError, TypeError):
            error = json.loads(error[5:])["error"]
    return re.sub(r"^\[StatusCode\.\w+\]\s*", "", error)


def error_kind(message: str) -> str:
    """A short kind for a server_message: its leading field name, e.g. `image[0]`,
    `sampling_parameters.temperature`; errors relayed from a downstream model ("llm: input_ids: ...")
    take the field after the model name."""
    while (match := re.match(r"([A-Za-z_][\w.\[\]]*): ", message)) is not None:
        if match.group(1) not in ("llm", "vision_encoder", "vlm"):
            return match.group(1)
        message = message[match.end():]
    lowered = message.lower()
    for kind, words in (("timeout", ("deadline exceeded", "timed out", "no answer within")),
                        ("cancelled", ("cancel",)), ("connection", ("unavailable", "connect"))):
        if any(w in lowered for w in words):
            return kind
    return "other"


def execute(endpoints: Endpoints, req: Request, concurrency: int, timeout: float, connection=None) -> Outcome:
    """Send one request and classify what came back; never raises, never waits past `timeout`."""
    started = time.monotonic()
    ttft, text, error, message = None, [], None, ""
    try:
        for piece in pieces(endpoints, req, timeout, connection):
            if piece and ttft is None and req.protocol in STREAMING:
                ttft = time.monotonic() - started
            text.append(piece)
            if req.kind == "cancel" and ttft is not None:
                error, message = "cancelled", "cancelled by the client after the first piece"
                break  # closing the generator cancels the stream (gRPC) or drops the connection (HTTP)
    except client.VLMError as e:
        message = server_message(str(e))
        error = error_kind(message)
    except (CallTimeout, TimeoutError) as e:
        error, message = "timeout", str(e) or "timed out"
    except urllib.error.URLError as e:
        timed_out = isinstance(e.reason, TimeoutError)
        error, message = ("timeout" if timed_out else "connection"), str(e)
    except OSError as e:
        error, message = "connection", repr(e)
    except Exception as e:  # noqa: BLE001  (a soak reports every failure, it does not stop on one)
        error, message = "other", f"{type(e).__name__}: {e}"
    if error is None:
        message = "".join(text)
    correct = None if error is not None or req.answer is None else message.strip() == req.answer
    return Outcome(req.kind, req.protocol, concurrency, error, message, time.monotonic() - started, ttft, correct)


# ---- server processes -------------------------------------------------------------------------

def server_processes(server_pid: int) -> dict[str, psutil.Process]:
    """tritonserver and its Python-backend stubs, named by instance (e.g. `llm_0_0`, from argv)."""
    server = psutil.Process(server_pid)
    found = {"tritonserver": server}
    for child in server.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            name = next((a for a in child.cmdline()[1:] if re.fullmatch(r"[A-Za-z]\w*?_\d+_\d+", a)), None)
            if name:
                found[name] = child
    return found


def rss_sample(server_pid: int, started: float) -> RssSample:
    rss = {}
    with contextlib.suppress(psutil.Error):
        for name, proc in server_processes(server_pid).items():
            with contextlib.suppress(psutil.Error):
                rss[name] = (proc.pid, proc.memory_info().rss)
    return RssSample(time.monotonic() - started, rss)


def sample_rss(server_pid: int, started: float, every_s: float, stop: threading.Event,
               samples: list[RssSample]) -> None:
    """Append a sample every `every_s` seconds until `stop` is set (a thread's target)."""
    while True:
        samples.append(rss_sample(server_pid, started))
        if stop.wait(every_s):
            return


def gauge(metrics_url: str, name: str) -> float | None:
    with urllib.request.urlopen(metrics_url, timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
    return None


def wait_drained(metrics_url: str, timeout: float) -> tuple[bool, str]:
    """Whether the engine goes idle (nothing running or waiting, every KV block back in the pool),
    and the gauges last seen."""
    names = ("requests_running", "requests_waiting", "kv_blocks_used")
    deadline = time.monotonic() + timeout
    while True:
        try:
            values = {n: gauge(metrics_url, f"triton_vlm_{n}") for n in names}
            seen = " ".join(f"{n}={v:g}" if v is not None else f"{n}=?" for n, v in values.items())
            if all(v == 0 for v in values.values()):
                return True, seen
        except (OSError, ValueError) as e:
            seen = f"metrics unreadable ({e})"
        if time.monotonic() > deadline:
            return False, seen
        time.sleep(0.5)


# ---- the run ----------------------------------------------------------------------------------

def run_phase(cfg: SoakConfig, endpoints: Endpoints, phase: int, concurrency: int, phase_end: float,
              outcomes: list[Outcome]) -> None:
    """`concurrency` workers send requests back to back until `phase_end`, then finish the calls they
    are in (each bounded by cfg.timeout_s)."""
    def worker(rng: random.Random) -> None:
        connection = None
        if cfg.grpc_reuse and any(p.startswith("grpc") for p in cfg.protocols):
            import tritonclient.grpc as grpcclient

            connection = grpcclient.InferenceServerClient(endpoints.grpc_url)
        try:
            while time.monotonic() < phase_end:
                outcome = execute(endpoints, draw_request(rng, cfg), concurrency, cfg.timeout_s, connection)
                outcomes.append(outcome)
                if outcome.error == "connection":
                    time.sleep(0.1)  # a dead server answers at once: do not spin
        finally:
            if connection is not None:
                connection.close()

    threads = [threading.Thread(target=worker, args=(random.Random(f"{cfg.seed}:{phase}:{i}"),), daemon=True)
               for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def run_soak(cfg: SoakConfig, endpoints: Endpoints, log: Callable[[str], None] = lambda line: None) -> SoakResult:
    if cfg.invalid_fraction and "cancel" in cfg.invalid_kinds and not set(cfg.protocols) & set(STREAMING):
        raise ValueError(f"invalid kind 'cancel' needs a streaming protocol ({', '.join(STREAMING)})")
    for url in (endpoints.grpc_url, endpoints.http_url, endpoints.metrics_url or "127.0.0.1"):
        host = url.split("://")[-1].split(":")[0]
        if host not in LOCAL_HOSTS:
            raise ValueError(f"{url}: the soak only talks to 127.0.0.1")
    notes = []
    if endpoints.server_pid is None:
        notes.append("no server pid: resident memory not measured")
    if endpoints.metrics_url is None:
        notes.append("no metrics url: engine drain not checked")
    outcomes: list[Outcome] = []
    started = time.monotonic()
    deadline = started + cfg.duration_s
    rss: list[RssSample] = []
    stop_sampling = threading.Event()
    sampler = threading.Thread(target=sample_rss, daemon=True,
                               args=(endpoints.server_pid, started, cfg.rss_every_s, stop_sampling, rss))
    if endpoints.server_pid:
        sampler.start()
    phase = 0
    try:
        while time.monotonic() < deadline:
            concurrency = cfg.concurrencies[phase % len(cfg.concurrencies)]
            run_phase(cfg, endpoints, phase, concurrency, min(time.monotonic() + cfg.phase_s, deadline), outcomes)
            failed = sum(not o.as_expected for o in outcomes)
            log(f"soak: {time.monotonic() - started:5.0f} s  concurrency {concurrency:3d}  "
                f"{len(outcomes)} requests, {failed} not as expected")
            phase += 1
    finally:
        stop_sampling.set()
        if sampler.is_alive():
            sampler.join()
    drained = None
    if endpoints.metrics_url:
        drained, seen = wait_drained(endpoints.metrics_url, cfg.drain_timeout_s)
        if not drained:
            notes.append(f"engine {cfg.drain_timeout_s:g} s after the traffic: {seen}")
    if endpoints.server_pid:
        rss.append(rss_sample(endpoints.server_pid, started))
    return SoakResult(cfg, outcomes, rss, drained, notes)


@contextlib.contextmanager
def own_server(checkpoint: str | Path, work_dir: str | Path, llm_params: dict[str, str] | None = None,
               image_cache_mb: float = 1.0):
    """Build a repository for `checkpoint` under `work_dir`, serve it (log: work_dir/server.log).

    A small image cache by default: it fills during the warm-up, so RSS growth after it is a leak rather
    than vlm's bounded cache filling (256 MB by default)."""
    from triton_vlm.repository import BuildOptions, build_repository
    from triton_vlm.server import TritonServer

    work_dir = Path(work_dir)
    repo = build_repository(checkpoint, work_dir / "repo",
                            BuildOptions(llm=dict(llm_params or {}), image_cache_mb=image_cache_mb))
    with TritonServer(repo, log_path=work_dir / "server.log") as server:
        yield server


# ---- figures ----------------------------------------------------------------------------------

def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"n": 0, "p50": None, "p99": None}
    return {"n": len(values), "p50": float(np.percentile(values, 50)), "p99": float(np.percentile(values, 99))}


def rss_growth(result: SoakResult) -> dict[str, dict]:
    """Per process: RSS at the first sample after warm-up and at the end, growth in %.

    A process that was there before the traffic but is missing at the end, or has another pid
    (a crashed stub restarted), gets that status instead of a growth.
    """
    after = [s for s in result.rss if s.elapsed_s >= result.config.warmup() - 1e-6]
    if not after:
        return {}
    first, start, end = result.rss[0], after[0], result.rss[-1]
    growth = {}
    for name in {**first.processes, **start.processes}:
        pid, rss = start.processes.get(name, (None, None))
        end_pid, end_rss = end.processes.get(name, (None, None))
        pids = {first.processes.get(name, (pid,))[0], pid, end_pid}
        status = "gone" if end_pid is None else "ok" if len(pids) == 1 else "restarted"
        growth[name] = {"start_mb": None if rss is None else rss / 2**20,
                        "end_mb": None if end_rss is None else end_rss / 2**20,
                        "growth_pct": 100.0 * (end_rss - rss) / rss if status == "ok" else None,
                        "status": status, "from_s": start.elapsed_s, "to_s": end.elapsed_s}
    return growth


def summary(result: SoakResult) -> dict:
    outs = result.outcomes
    valid = [o for o in outs if o.valid]
    checked = [o for o in valid if o.correct is not None]
    mismatched = [o for o in outs if not o.valid and not o.as_expected]
    return {
        "config": asdict(result.config) | {"warmup_s": result.config.warmup()},
        "requests": len(outs),
        "by_kind": dict(Counter(o.kind for o in outs)),
        "by_protocol": dict(Counter(o.protocol for o in outs)),
        "by_concurrency": {str(c): n for c, n in sorted(Counter(o.concurrency for o in outs).items())},
        "valid_failures": dict(Counter(o.error for o in valid if o.error is not None)),
        "expected_errors": dict(Counter(f"{o.kind}: {o.error}" for o in outs if not o.valid and o.as_expected)),
        "invalid_unexpected_success": dict(Counter(o.kind for o in mismatched if o.error is None)),
        "invalid_wrong_error": dict(Counter(f"{o.kind}: {o.error}" for o in mismatched if o.error is not None)),
        "failure_examples": _examples([o for o in outs if not o.as_expected]),
        "latency_s": percentiles([o.latency_s for o in valid if o.error is None]),
        "ttft_s": percentiles([o.ttft_s for o in valid if o.error is None and o.ttft_s is not None]),
        "greedy_answers": {"checked": len(checked), "wrong": sum(not o.correct for o in checked)},
        "rss": rss_growth(result),
        "rss_samples": [{"t_s": round(s.elapsed_s, 1), **{k: v[1] for k, v in s.processes.items()}}
                        for s in result.rss],
        "drained": result.drained,
        "notes": result.notes,
        "missed_targets": missed_targets(result),
    }


def _examples(outs: list[Outcome], most: int = 12) -> list[str]:
    """One outcome per (kind, error), valid requests first, at most `most`."""
    firsts = {}
    for o in sorted(outs, key=lambda o: not o.valid):
        firsts.setdefault((o.kind, o.error), o)
    return [f"{o.kind} over {o.protocol} at concurrency {o.concurrency}: {o.error or 'succeeded'}: {o.message[:200]}"
            for o in list(firsts.values())[:most]]


def missed_targets(result: SoakResult) -> list[str]:
    missed = []
    failures = [o for o in result.outcomes if o.valid and o.error is not None]
    if failures:
        missed.append(f"{len(failures)} valid request(s) failed")
    mismatched = [o for o in result.outcomes if not o.valid and not o.as_expected]
    if mismatched:
        missed.append(f"{len(mismatched)} invalid request(s) did not get their error")
    for name, g in rss_growth(result).items():
        if g["status"] != "ok":
            missed.append(f"{name}: {g['status']} during the run")
        elif g["growth_pct"] > result.config.max_rss_growth_pct:
            missed.append(f"{name}: RSS grew {g['growth_pct']:.1f}% after warm-up "
                          f"(target <= {result.config.max_rss_growth_pct:g}%)")
    if result.drained is False:
        missed.append(f"engine not idle {result.config.drain_timeout_s:g} s after the traffic stopped")
    return missed


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def table(result: SoakResult) -> str:
    s = summary(result)
    cfg = result.config
    lines = [f"soak: {cfg.duration_s:g} s, concurrency {'/'.join(map(str, cfg.concurrencies))} "
             f"(phases of {cfg.phase_s:g} s), warm-up {cfg.warmup():g} s, timeout {cfg.timeout_s:g} s per call",
             "", f"{'kind':<16}{'sent':>7}{'as expected':>13}{'not':>6}  errors"]
    for kind in ["valid", *INVALID]:
        outs = [o for o in result.outcomes if o.kind == kind]
        errors = Counter(o.error or "ok" for o in outs)
        lines.append(f"{kind:<16}{len(outs):>7}{sum(o.as_expected for o in outs):>13}"
                     f"{sum(not o.as_expected for o in outs):>6}  "
                     + ", ".join(f"{k} {n}" for k, n in errors.most_common()))
    lines.append(f"{'total':<16}{len(result.outcomes):>7}")
    lines.append("by concurrency: " + "  ".join(f"{c}: {n}" for c, n in s["by_concurrency"].items()))
    lines.append("by protocol:    " + "  ".join(f"{p}: {n}" for p, n in s["by_protocol"].items()))
    lines.append("")
    lat, ttft, greedy = s["latency_s"], s["ttft_s"], s["greedy_answers"]
    lines.append(f"latency of valid requests (s): p50 {_seconds(lat['p50'])}  p99 {_seconds(lat['p99'])}  "
                 f"(n={lat['n']})")
    lines.append(f"time to first text, streamed (s): p50 {_seconds(ttft['p50'])}  p99 {_seconds(ttft['p99'])}  "
                 f"(n={ttft['n']})")
    lines.append(f"greedy one-image answers: {greedy['checked'] - greedy['wrong']} of {greedy['checked']} "
                 "match the scene")
    if s["rss"]:
        lines += ["", f"{'process':<22}{'RSS start MB':>13}{'end MB':>9}{'growth':>9}"]
        for name, g in s["rss"].items():
            growth = f"{g['growth_pct']:+.1f}%" if g["growth_pct"] is not None else g["status"]
            start, end = ("-" if mb is None else f"{mb:.1f}" for mb in (g["start_mb"], g["end_mb"]))
            lines.append(f"{name:<22}{start:>13}{end:>9}{growth:>9}")
        first = next(iter(s["rss"].values()))
        lines.append(f"(from {first['from_s']:.0f} s, after warm-up, to {first['to_s']:.0f} s)")
    if s["drained"] is not None:
        lines.append(f"engine idle after the traffic: {'yes' if s['drained'] else 'NO'}")
    if s["failure_examples"]:
        lines += ["", "not as expected (examples):"] + [f"  {e}" for e in s["failure_examples"]]
    lines += [f"note: {n}" for n in s["notes"]]
    lines += ["", "targets: " + ("all met" if not s["missed_targets"] else "MISSED")]
    lines += [f"  missed: {m}" for m in s["missed_targets"]]
    return "\n".join(lines)
