"""What the engine reports after each step, as plain data: its state, and what happened in the step.

The engine fills an IterationStats while it steps and hands it, with EngineStats, to `on_step`; whoever
exports metrics (triton/metrics.py) owns it from then on. New counters are a field here and a line there.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple


class EngineStats(NamedTuple):
    kv_blocks_used: int
    kv_blocks_total: int
    num_running: int
    num_waiting: int
    num_preemptions: int
    num_admitted: int = 0  # requests admitted so far: tells which of several engines took work
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache so far
    prefix_cache_hits: int = 0  # of which found cached (whole blocks)


class FinishedRequest(NamedTuple):
    e2e_s: float  # added -> its last output
    queue_s: float  # added -> first scheduled
    prompt_tokens: int
    generation_tokens: int  # over all its completions
    n: int
    finish_reason: str  # of its first completion: "stop", "length", "abort" or "error"


@dataclass
class IterationStats:
    prompt_tokens: int = 0  # prompts of the requests that got their first token
    generation_tokens: int = 0
    ttft_s: list[float] = field(default_factory=list)  # added -> first token, per request
    itl_s: list[float] = field(default_factory=list)  # between a completion's consecutive tokens
    finished: list[FinishedRequest] = field(default_factory=list)

    def merge(self, other: "IterationStats") -> None:
        self.prompt_tokens += other.prompt_tokens
        self.generation_tokens += other.generation_tokens
        self.ttft_s += other.ttft_s
        self.itl_s += other.itl_s
        self.finished += other.finished
