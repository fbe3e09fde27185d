#!/usr/bin/env python
"""Exact-match accuracy of the toy VLM on fresh held-out scenes, in process or through Triton.

  eval_toy_vlm.py --backend hf
  eval_toy_vlm.py --backend triton --url 127.0.0.1:8001
  eval_toy_vlm.py --backend triton --start-server
  eval_toy_vlm.py --compare --start-server      # HF and Triton answers must agree exactly

Exits 1 when a per-type accuracy target is missed or (with --compare) any answer differs.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from pathlib import Path

# On a shared CPU, spinning OpenMP workers wait on descheduled peers (see train_toy_vlm.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from triton_vlm.toy import evaluate as ev  # noqa: E402


@contextlib.contextmanager
def served(checkpoint: str, url: str | None, start: bool):
    """The gRPC url of a Triton server holding `vlm`: the given one, or one started here."""
    if not start:
        if not url:
            raise SystemExit("--backend triton needs --url or --start-server")
        yield url
        return
    from triton_vlm.repository import build_repository
    from triton_vlm.server import TritonServer

    with tempfile.TemporaryDirectory(prefix="toy-vlm-") as tmp:
        repo = build_repository(checkpoint, Path(tmp) / "repo")
        log = Path(tmp) / "tritonserver.log"
        with TritonServer(repo, log_path=log) as srv:
            print(f"tritonserver ready at {srv.grpc_url} (log {log})", flush=True)
            yield srv.grpc_url


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="models/toy-vlm")
    ap.add_argument("--backend", choices=["hf", "triton"], default="hf")
    ap.add_argument("--compare", action="store_true", help="run both backends and count differing answers")
    ap.add_argument("--url", help="Triton gRPC address, e.g. 127.0.0.1:8001")
    ap.add_argument("--start-server", action="store_true", help="build a repository and start tritonserver here")
    ap.add_argument("-n", type=int, default=500, help="held-out single questions")
    ap.add_argument("--chats", type=int, help="held-out chats of 2-3 turns, scored on their follow-ups (default n/5)")
    ap.add_argument("--seed", type=int, default=0, help="held-out stream; disjoint from every training seed")
    ap.add_argument("--show-errors", type=int, default=5, help="print up to this many wrong answers")
    args = ap.parse_args()
    chats = args.n // 5 if args.chats is None else args.chats
    if args.n < 500:
        print(f"note: n={args.n} is below the 500 the targets are defined on", file=sys.stderr)

    import torch

    torch.set_num_threads(2)
    model, processor = ev.load_hf(args.checkpoint)
    runs: dict[str, list[ev.Result]] = {}

    def run(predict) -> list[ev.Result]:
        return (ev.evaluate(predict, processor, n=args.n, seed=args.seed)
                + ev.evaluate_chats(predict, processor, n=chats, seed=args.seed))

    if args.compare or args.backend == "hf":
        runs["hf"] = run(ev.hf_predictor(model, processor))
    if args.compare or args.backend == "triton":
        with served(args.checkpoint, args.url, args.start_server) as url:
            runs["triton"] = run(ev.triton_predictor(url))

    failed = False
    for name, results in runs.items():
        print(ev.table(results, f"\n{name}: {args.checkpoint}, {args.n} held-out pairs and {chats} chats (seed {args.seed})"))
        for r in [r for r in results if not r.correct][:args.show_errors]:
            print(f"  wrong [{r.qtype}] {r.question!r}: expected {r.answer!r}, got {r.prediction!r}")
        missed = ev.missed_targets(results)
        if missed:
            print(f"{name}: targets missed: " + "; ".join(missed))
            failed = True
    if args.compare:
        diffs = [(h, t) for h, t in zip(runs["hf"], runs["triton"]) if h.prediction != t.prediction]
        print(f"\nHF vs Triton: {len(diffs)} of {len(runs['hf'])} answers differ")
        for h, t in diffs[:args.show_errors]:
            print(f"  [{h.qtype}] {h.question!r}: hf {h.prediction!r}, triton {t.prediction!r}")
        failed |= bool(diffs)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
