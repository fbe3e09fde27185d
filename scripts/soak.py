#!/usr/bin/env python
"""Soak the server with mixed valid and invalid traffic; report errors, latency and memory growth.

  soak.py                                   # serve models/toy-vlm here for 10 minutes
  soak.py --duration 60 --json soak.json    # a one-minute run, figures also written as JSON
  soak.py --url 127.0.0.1:8001 --server-pid 1234   # a running server (HTTP on 8000, metrics on 8002)

Exits 1 when a target is missed: a valid request failed, an invalid request did not get its
error, a server process grew its RSS by more than --max-rss-growth % after the warm-up, or the
engine did not go idle after the traffic.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys

from triton_vlm import soak


def endpoints(args, stack: contextlib.ExitStack) -> soak.Endpoints:
    if not args.url:
        server = stack.enter_context(soak.own_server(args.checkpoint, args.work_dir, dict(args.llm_param),
                                                   args.image_cache_mb))
        print(f"tritonserver ready at {server.grpc_url} (log {server.log_path})", file=sys.stderr, flush=True)
        return soak.Endpoints.of(server)
    host = args.url.rsplit(":", 1)[0]
    return soak.Endpoints(args.url, args.http_url or f"{host}:8000",
                          args.metrics_url or f"http://{host}:8002/metrics", args.server_pid)


def key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=600.0, help="seconds of traffic (default 600)")
    ap.add_argument("--concurrency", default="1,4,16", help="client worker counts, cycled (default 1,4,16)")
    ap.add_argument("--phase", type=float, default=20.0, help="seconds at each concurrency level")
    ap.add_argument("--warmup", type=float, help="seconds before the RSS baseline (default: 10%% of the run, "
                                                 "at least one cycle of concurrency levels)")
    ap.add_argument("--invalid-fraction", type=float, default=0.3)
    ap.add_argument("--invalid-kinds", default=",".join(soak.INVALID), help="comma-separated subset")
    ap.add_argument("--protocols", default=",".join(soak.PROTOCOLS), help="comma-separated subset")
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds per client call")
    ap.add_argument("--max-rss-growth", type=float, default=5.0, help="target, in %% after warm-up")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--grpc-reuse", action="store_true",
                    help="each gRPC client worker keeps one connection for all its requests, as real clients do "
                         "(default: a new connection per request)")
    ap.add_argument("--checkpoint", default="models/toy-vlm", help="served here unless --url is given")
    ap.add_argument("--work-dir", default="work/soak", help="repository and server.log of the served checkpoint")
    ap.add_argument("--image-cache-mb", type=float, default=1.0,
                    help="vlm's image cache of the served checkpoint (default 1: it fills in the warm-up, so "
                         "growth after it is a leak, not the cache filling)")
    ap.add_argument("--llm-param", type=key_value, action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--url", help="gRPC address of a running server, e.g. 127.0.0.1:8001")
    ap.add_argument("--http-url", help="its HTTP address (default: the same host, port 8000)")
    ap.add_argument("--metrics-url", help="its metrics URL (default: http://HOST:8002/metrics)")
    ap.add_argument("--server-pid", type=int, help="its tritonserver PID, for RSS (without it RSS is skipped)")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()

    for flag, value, known in (("--invalid-kinds", args.invalid_kinds, soak.INVALID),
                               ("--protocols", args.protocols, soak.PROTOCOLS)):
        unknown = set(value.split(",")) - set(known)
        if unknown:
            ap.error(f"{flag}: unknown {sorted(unknown)}; known: {', '.join(known)}")
    cfg = soak.SoakConfig(duration_s=args.duration, concurrencies=tuple(int(c) for c in args.concurrency.split(",")),
                          phase_s=args.phase, warmup_s=args.warmup, invalid_fraction=args.invalid_fraction,
                          invalid_kinds=tuple(args.invalid_kinds.split(",")),
                          protocols=tuple(args.protocols.split(",")), timeout_s=args.timeout,
                          max_rss_growth_pct=args.max_rss_growth, seed=args.seed, grpc_reuse=args.grpc_reuse)
    with contextlib.ExitStack() as stack:
        result = soak.run_soak(cfg, endpoints(args, stack), log=lambda line: print(line, file=sys.stderr, flush=True))
    print(soak.table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(soak.summary(result), f, indent=2)
    return 1 if soak.missed_targets(result) else 0


if __name__ == "__main__":
    sys.exit(main())
