"""The `triton-vlm` command: make-tiny, build, serve, openai, install-stub, bench."""
from __future__ import annotations

import argparse
import signal
import sys
import time
from dataclasses import fields
from pathlib import Path

from .engine.config import EngineConfig
from .limits import ServingLimits


def cmd_make_tiny(args) -> None:
    if args.family == "llava":
        from .checkpoint import make_tiny

        print(make_tiny(args.out_dir, seed=args.seed))
        return
    from .checkpoint_qwen import make_tiny_qwen

    print(make_tiny_qwen(args.out_dir, version="2.5" if args.family == "qwen2_5_vl" else "2", seed=args.seed))


def cmd_build(args) -> None:
    from .repository import BuildOptions, build_repository

    llm = dict(kv.split("=", 1) for kv in args.llm_param)
    if not args.prefix_caching:
        llm["enable_prefix_caching"] = "0"
    if args.image_cache_mb < 0:
        raise SystemExit(f"--image-cache-mb: must be >= 0, got {args.image_cache_mb:g}")
    limits = ServingLimits(**{f.name: getattr(args, f.name) for f in fields(ServingLimits)})
    options = BuildOptions(vision_backend=args.vision_backend, vision_max_batch_size=args.vision_max_batch_size,
                           limits=limits, llm=llm, ort_intra_op_threads=args.vision_threads, gpus=args.gpus,
                           llm_instances=args.llm_instances, image_cache_mb=args.image_cache_mb)
    try:
        print(build_repository(args.model, args.output, options))
    except (ValueError, FileNotFoundError, RuntimeError) as e:  # a bad checkpoint, a refused option, no TensorRT
        raise SystemExit(f"triton-vlm build: {e}") from None


def add_limit_flags(parser: argparse.ArgumentParser) -> None:
    """One --flag per ServingLimits field, with its default."""
    group = parser.add_argument_group("serving limits (what one vlm request may ask for)")
    for f in fields(ServingLimits):
        default = getattr(ServingLimits(), f.name)
        group.add_argument(f"--{f.name.replace('_', '-')}", type=type(default), default=default,
                           help=f"default {default}" + (" (from the model)" if default == 0 else ""))


def cmd_serve(args) -> None:
    from .server import Ports, TritonServer
    from .supervisor import Supervisor

    # The supervisor reloads models, so it needs explicit model control; without it the model APIs stay shut.
    server = TritonServer(args.model_repository, Ports.pick(args.http_port, args.grpc_port, args.metrics_port),
                          host=args.host, log_path=args.log_file, verbose=args.verbose, model_control=args.supervise,
                          metrics=args.metrics, admin_header=args.restrict_admin)
    # SIGTERM takes the same clean path as Ctrl-C.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    openai = None
    try:
        started = time.monotonic()
        server.start(timeout=args.timeout)
        print(f"triton-vlm: ready  http={server.http_url}  grpc={server.grpc_url}  "
              f"metrics={server.metrics_url or 'off'}", flush=True)
        if args.openai_port:
            from .openai_api import start

            # Beside Triton in this process; it reaches vlm over gRPC, so a restarted server is found again.
            openai = start(openai_config(args, server.grpc_url), args.host, args.openai_port)
            print(f"triton-vlm: OpenAI API at http://{args.host}:{args.openai_port}/v1", flush=True)
        if args.supervise:
            # Reloading one model should not take 3x the whole first start; beyond that the server is wedged.
            load_timeout = max(30.0, 3 * (time.monotonic() - started))
            # Returns only by raising: GaveUp (a RuntimeError) after too many recoveries, or the interrupt.
            Supervisor(server, max_restarts=args.max_restarts, load_timeout=load_timeout,
                       start_timeout=args.timeout, deadlocked_s=args.deadlocked_after_s).run()
        while server.proc.poll() is None:
            time.sleep(0.5)
        print(f"triton-vlm: tritonserver exited with code {server.proc.returncode}", file=sys.stderr)
        sys.exit(server.proc.returncode or 1)
    except KeyboardInterrupt:
        print("triton-vlm: stopping", flush=True)
    except (RuntimeError, TimeoutError) as e:
        print(f"triton-vlm: {e}", file=sys.stderr)
        sys.exit(1)
    finally:
        if openai is not None:
            openai.stop()
        server.stop()


def openai_config(args, grpc_url: str):
    from .openai_api import OpenAIConfig
    from .remote_media import MediaPolicy

    domains = tuple(d.strip().lower() for d in args.allowed_media_domains.split(",") if d.strip())
    return OpenAIConfig(grpc_url, args.served_model_name,
                        MediaPolicy(domains, timeout_s=args.media_timeout_s, max_bytes=args.max_media_bytes))


def cmd_openai(args) -> None:
    from .openai_api import run

    print(f"triton-vlm: OpenAI API at http://{args.host}:{args.port}/v1 for vlm at {args.grpc_url}", flush=True)
    run(openai_config(args, args.grpc_url), args.host, args.port)


def add_openai_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("OpenAI-compatible API")
    group.add_argument("--served-model-name", default="",
                       help="the model id clients name (default: the checkpoint directory's name)")
    group.add_argument("--allowed-media-domains", default="", metavar="DOMAIN[,DOMAIN...]",
                       help="fetch http(s) image and video URLs from these domains and their subdomains only "
                            "(default: none; clients send data: URLs)")
    group.add_argument("--media-timeout-s", type=float, default=10.0, help="the longest one media fetch may take")
    group.add_argument("--max-media-bytes", type=int, default=32 * 1024 * 1024, help="the largest media file fetched")


def admin_header(text: str) -> tuple[str, str]:
    from .server import check_admin_header

    key, _, value = text.partition("=")
    try:
        check_admin_header(key, value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return key, value


def cmd_bench(args) -> None:
    # OpenMP's wait policy is left to the environment. PASSIVE (idle threads sleep) is kinder to a shared
    # machine but slows every multi-threaded system: at 2 threads HF one at a time ran 51 tok/s against 90,
    # and a batch-16 engine step 26 ms against 21. With --threads 1 it does not matter.
    from . import bench

    if args.preset not in bench.PRESETS:
        raise SystemExit(f"--preset: unknown {args.preset!r}; choose from {', '.join(bench.PRESETS)}")
    if args.repeats is None:
        args.repeats = 2 if args.what == "serve" else 5
    if args.what == "serve":
        from . import bench_serve

        bench_serve.main(args)
    else:
        bench.main(args)


def cmd_install_stub(args) -> None:
    from .server import install_stub

    print(install_stub())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="triton-vlm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-tiny", help="write a small random checkpoint (no download)")
    p.add_argument("out_dir", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--family", choices=["llava", "qwen2_vl", "qwen2_5_vl"], default="llava")
    p.set_defaults(func=cmd_make_tiny)

    p = sub.add_parser("build", help="render a Triton model repository for a checkpoint (LLaVA, Qwen2-VL, Qwen2.5-VL)")
    p.add_argument("--model", required=True, type=Path, help="Hugging Face checkpoint directory")
    p.add_argument("--output", required=True, type=Path, help="model repository to write")
    p.add_argument("--vision-backend", choices=["onnxruntime", "tensorrt"], default="onnxruntime")
    p.add_argument("--vision-max-batch-size", type=int, default=8)
    p.add_argument("--gpus", type=int, default=0,
                   help="llm runs one engine on each of GPUs 0..N-1 and vision_encoder is spread across them "
                        "(vlm stays on CPU); 0: CPU only")
    p.add_argument("--llm-instances", type=int, default=1,
                   help="without --gpus: llm engines on CPU, each its own process and KV pool")
    p.add_argument("--llm-param", action="append", default=[], metavar="KEY=VALUE",
                   help="engine setting for the llm model, e.g. block_size=16, num_kv_blocks=4096; "
                        "torch_threads=N: the llm stub's share of the cores (default: all of them)")
    p.add_argument("--vision-threads", type=int, default=0,
                   help="onnxruntime threads of the vision_encoder stub (default 0: onnxruntime's own, one per core)")
    p.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false",
                   help="llm computes every prompt in full (the same as --llm-param enable_prefix_caching=0)")
    p.add_argument("--image-cache-mb", type=float, default=256.0,
                   help="vlm keeps this many MB of image embeddings by content hash (0: off); default 256")
    add_limit_flags(p)
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("serve", help="run tritonserver on a model repository until Ctrl-C or SIGTERM")
    p.add_argument("--model-repository", required=True, type=Path)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--log-file", type=Path, help="write the server log here instead of the terminal")
    p.add_argument("--timeout", type=float, default=600, help="seconds to wait for every model to be ready")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--no-supervise", dest="supervise", action="store_false",
                   help="do not restart a dead server or reload a model whose stub died")
    p.add_argument("--max-restarts", type=int, default=5,
                   help="recoveries allowed within 10 minutes before serve gives up and exits 1")
    p.add_argument("--deadlocked-after-s", type=float, default=60.0,
                   help="restart the server when the vlm or llm stub has not answered a ping for this long")
    p.add_argument("--no-metrics", dest="metrics", action="store_false", help="turn Triton's metrics port off")
    p.add_argument("--restrict-admin", type=admin_header, metavar="KEY=VALUE",
                   help="model-repository, shared-memory, trace and logging APIs answer only requests carrying "
                        "this HTTP header (gRPC: metadata triton-grpc-protocol-KEY=VALUE); inference, health and "
                        "statistics stay open")
    p.add_argument("--openai-port", type=int, default=0,
                   help="also serve the OpenAI-compatible API (/v1/chat/completions ...) on this port, on --host")
    add_openai_flags(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("openai", help="serve the OpenAI-compatible API for a running Triton's vlm model")
    p.add_argument("--grpc-url", default="127.0.0.1:8001", help="the Triton server's gRPC address")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    add_openai_flags(p)
    p.set_defaults(func=cmd_openai)

    p = sub.add_parser("bench", help="engine vs HF transformers in one process; decode efficiency vs the roofline; "
                                     "the served path vs the in-process engine; prefix and image caching through a real server")
    p.add_argument("what", choices=["engine", "roofline", "serve", "cache"],
                   help="engine: the systems side by side + efficiency; roofline: efficiency + KV waste and capacity; "
                        "serve: tritonserver over gRPC streaming with images vs LLMEngine in process, same requests; "
                        "cache: time to first token cold and with cache hits, through tritonserver")
    p.add_argument("--preset", default="58m", help="decoder geometry of the random checkpoint: 58m, 134m, tiny")
    p.add_argument("--checkpoint", type=Path, help="use this LLaVA checkpoint instead of writing one")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--min-prompt", type=int, default=20)
    p.add_argument("--max-prompt", type=int, default=200)
    p.add_argument("--max-tokens", type=int, default=64, help="greedy tokens per request (EOS ignored)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 32], help="decode batch sizes for efficiency")
    p.add_argument("--steps", type=int, default=16, help="decode steps timed per batch size (median)")
    p.add_argument("--block-size", type=int, default=EngineConfig.block_size,
                   help="KV block size of the engine under test")
    p.add_argument("--kv-budget-tokens", type=int, default=8192, help="roofline: the fixed KV budget")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads for every system (0: torch's default); on a shared machine 1 avoids "
                        "OpenMP barriers waiting on a descheduled thread")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 32], help="serve: client concurrency levels")
    p.add_argument("--repeats", type=int, help="serve: runs of each side per level, the fastest counts (default 2); "
                                               "cache: requests per case, the median counts (default 5)")
    p.add_argument("--min-requests", type=int, default=8,
                   help="serve: requests per level, at least (and at least 2 x the concurrency)")
    p.add_argument("--llm-param", action="append", default=[], type=lambda kv: tuple(kv.split("=", 1)),
                   metavar="KEY=VALUE", help="serve: engine setting for both sides, e.g. max_num_seqs=32")
    p.add_argument("--context-words", type=int, default=150, help="cache: words of text in the first prompt")
    p.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false",
                   help="cache: serve with prefix caching off (the image cache stays on)")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("install-stub", help="put the Python-backend stub where tritonserver finds it")
    p.set_defaults(func=cmd_install_stub)

    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
