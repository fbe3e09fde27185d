"""A one-minute soak of the real server: mixed valid and invalid traffic at 1, 4 and 16 clients.

The full run is scripts/soak.py (10 minutes by default); this is its short version, on the
session's toy server.
"""
from __future__ import annotations

import pytest
from helpers import TOY_CHECKPOINT, serve

from triton_vlm import soak

# RSS is compared from the end of the warm-up, which covers one full 1/4/16 cycle: in our runs
# tritonserver grew 39 -> 44 MB during that first cycle and was flat after it. From there to the end,
# over a dozen 30-60 s runs, tritonserver grew by at most 1.3% (3.5% once, in a run where the vlm
# stub crashed) and the stubs by under 1%, so the 10-minute target of 5% holds over one minute too.
# It fails a leak of ~1 kB a request in tritonserver, ~8 kB in a stub (about 2000 requests after
# the warm-up).
# Cancelled streams are part of the mix: they used to crash Triton 2.51's vlm stub within a
# minute at 4-16 clients (see triton/vlm.py, Streams).
# The server has a 0.5 MB image cache: it fills during the warm-up, so what grows after it is a leak, not
# a bounded cache filling (with the default 256 MB, vlm grew 7% in a minute of fresh images).
KINDS = tuple(soak.INVALID)
CONFIG = soak.SoakConfig(duration_s=60, concurrencies=(1, 4, 16), phase_s=5, timeout_s=30, invalid_kinds=KINDS)


@pytest.fixture(scope="module")
def soak_server(tmp_path_factory):
    server = serve(TOY_CHECKPOINT, tmp_path_factory, "soak", image_cache_mb=0.5)
    yield server
    server.stop()


def test_one_minute_soak(soak_server):
    result = soak.run_soak(CONFIG, soak.Endpoints.of(soak_server))
    report = soak.table(result)
    figures = soak.summary(result)

    assert figures["valid_failures"] == {}, report
    for kind in KINDS:
        sent = [o for o in result.outcomes if o.kind == kind]
        assert sent, f"no {kind} request was sent\n{report}"
        assert all(o.as_expected for o in sent), f"{kind}: not all got their error\n{report}"
    assert set(figures["by_concurrency"]) == {"1", "4", "16"}, report
    assert all(n >= 20 for n in figures["by_concurrency"].values()), report
    assert result.drained, report
    growth = figures["rss"]
    assert {"tritonserver", "vlm_0_0", "llm_0_0", "vision_encoder_0_0"} <= set(growth), report
    assert all(g["status"] == "ok" and g["growth_pct"] <= CONFIG.max_rss_growth_pct for g in growth.values()), report
    assert soak.missed_targets(result) == [], report


def test_grpc_workers_can_keep_one_connection(soak_server):
    # --grpc-reuse: each worker sends every request, cancelled streams included, over its one connection.
    cfg = soak.SoakConfig(duration_s=8, concurrencies=(4,), phase_s=8, protocols=("grpc", "grpc_stream"),
                          invalid_kinds=("bad_json", "cancel"), grpc_reuse=True)
    result = soak.run_soak(cfg, soak.Endpoints.of(soak_server))
    report = soak.table(result)
    assert soak.summary(result)["valid_failures"] == {}, report
    assert all(o.as_expected for o in result.outcomes), report
    assert {o.kind for o in result.outcomes} == {"valid", "bad_json", "cancel"}, report


def test_error_kinds_name_the_field():
    kinds = {
        "image[1]: not a decodable image (neither an image file nor base64 of one)": "image[1]",
        "[StatusCode.INVALID_ARGUMENT] sampling_parameters.temperature: must be >= 0, got nan":
            "sampling_parameters.temperature",
        'data: {"error":"image: 2 image(s) sent but text_input has 1 <image> placeholder(s)"}\n\n': "image",
        "llm: input_ids: prompt has 20007 tokens; at most 255 fit": "input_ids",
        "[StatusCode.DEADLINE_EXCEEDED] Deadline Exceeded": "timeout",
        "[StatusCode.CANCELLED] Locally cancelled by application!": "cancelled",
        "Stub process 'vlm_0_0' is not healthy.": "other",
    }
    assert {m: soak.error_kind(soak.server_message(m)) for m in kinds} == kinds
