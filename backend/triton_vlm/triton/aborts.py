"""Aborts shared by the instances of one model (one stub process each).

vlm aborts an llm request by sending `abort` with its request id (Triton 2.51's BLS cannot cancel a
stream), and Triton hands that abort to whichever llm instance is free, not necessarily the one
running the request. So every instance posts the aborts it receives here, a directory of empty files
named by a hash of the request id, and every instance looks for its own requests among them.
An abort stays posted for KEEP_S, so request ids must not come back within that time (vlm's are uuid4).
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import time
from pathlib import Path

KEEP_S = 60.0  # an abort posted for a request no instance holds (it had ended) is dropped after this


class AbortBoard:
    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    @classmethod
    def for_model(cls, model_name: str) -> "AbortBoard":
        # The stubs' parent is the tritonserver process: one board per server run and model.
        return cls(Path(tempfile.gettempdir()) / f"triton_vlm_aborts_{os.getppid()}_{model_name}")

    def _entry(self, request_id: str) -> Path:
        # Hashed: a request id is any string a caller chose, '/' and '..' included.
        return self.directory / hashlib.sha1(request_id.encode()).hexdigest()

    def post(self, request_id: str) -> None:
        self._entry(request_id).touch()
        self._sweep()

    def posted(self, request_id: str) -> bool:
        return self._entry(request_id).exists()

    def _sweep(self) -> None:
        old = time.time() - KEEP_S
        for entry in self.directory.iterdir():
            try:
                if entry.stat().st_mtime < old:
                    entry.unlink()
            except FileNotFoundError:  # another instance swept it first
                pass
