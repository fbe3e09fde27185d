"""`triton-vlm bench` in a small run, so the benchmark keeps working (no timing is asserted)."""
from __future__ import annotations

import json

from triton_vlm.cli import main

SMALL = ["--requests", "3", "--min-prompt", "5", "--max-prompt", "30", "--max-tokens", "4", "--batches", "1", "2",
         "--steps", "2"]


def test_bench_engine_runs_every_system_on_the_same_ids(tmp_path, capsys):
    out = tmp_path / "engine.json"
    main(["bench", "engine", "--preset", "tiny", *SMALL, "--json", str(out)])
    result = json.loads(out.read_text())
    names = [s["system"] for s in result["systems"]]
    assert names[0] == "HF generate, one at a time" and names[-1] == "LLMEngine.generate"
    assert "HF generate, static batch of 3" in names
    for s in result["systems"]:
        assert s["error"] is None, s
        assert s["tokens"] == 3 * 4 and s["outputs_equal_to_hf"] == 3
    assert result["all_equal"]
    assert [r["batch"] for r in result["efficiency"]["steps"]] == [1, 2]
    assert all(r["step_ms"] > 0 and r["efficiency"] > 0 for r in result["efficiency"]["steps"])
    printed = capsys.readouterr().out
    assert "LLMEngine.generate" in printed and "greedy outputs: all equal" in printed


def test_bench_roofline_reports_kv_waste_and_capacity(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "roofline.json"
    main(["bench", "roofline", "--checkpoint", str(tiny_checkpoint), *SMALL, "--kv-budget-tokens", "4096",
          "--json", str(out)])
    result = json.loads(out.read_text())
    waste = result["kv_waste_at_peak"]
    assert 0 < waste["live_tokens"] <= waste["allocated_slots"]
    assert 0 <= waste["waste"] < 1
    budget = result["kv_budget"]
    assert budget["contiguous_fit"] == 4096 // budget["max_model_len"]
    # 12 short requests all fit the paged budget at once; max-length slabs hold only two.
    assert budget["paged_max_running"] == 12 and budget["preemptions"] == 0
    assert "KV waste at peak load" in capsys.readouterr().out


def test_bench_serve_runs_both_sides_on_the_same_requests(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "serve.json"
    main(["bench", "serve", "--checkpoint", str(tiny_checkpoint), "--concurrency", "1", "3", "--min-requests", "2",
          "--max-prompt", "30", "--max-tokens", "5", "--repeats", "1", "--threads", "1", "--json", str(out)])
    result = json.loads(out.read_text())
    assert [lv["concurrency"] for lv in result["levels"]] == [1, 3]
    for lv, requests in zip(result["levels"], (2, 6)):
        for side in ("served", "in_process"):
            r = lv[side]
            assert r["requests"] == requests and r["tokens"] == requests * 5
            assert 0 < r["ttft_p50_ms"] <= r["ttft_p99_ms"] and 0 <= r["itl_p50_ms"] <= r["itl_p99_ms"]
            assert 1 <= r["tokens_per_response"] <= 5
        # Greedy, the same ids and embeddings: every served answer is the in-process one.
        assert lv["outputs_equal"] == requests
        assert lv["ratio"] == lv["served"]["tokens_per_s"] / lv["in_process"]["tokens_per_s"]
    assert "served/in-process" in capsys.readouterr().out


def test_bench_cache_runs_through_the_server(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "cache.json"
    main(["bench", "cache", "--checkpoint", str(tiny_checkpoint), "--repeats", "1", "--context-words", "20",
          "--json", str(out)])
    result = json.loads(out.read_text())
    assert set(result["ttft_ms"]) == {"cold", "same", "new_question", "turn1", "turn4"}
    assert all(t > 0 for t in result["ttft_ms"].values())
    assert 0 < result["prefix_cache"]["hits"] < result["prefix_cache"]["queries"]
    # Misses: the warm-up's, cold's and the chat's two new images; hits: same, new question, and the chat
    # resending its images (1 in turn 2, 1 in turn 3, 2 in turn 4).
    assert result["image_cache"] == {"hits": 2 + 4, "misses": 2 + 2}
    assert "same image, same prompt" in capsys.readouterr().out


def test_bench_cache_without_prefix_caching_hits_only_images(tiny_checkpoint, tmp_path):
    out = tmp_path / "cache.json"
    main(["bench", "cache", "--checkpoint", str(tiny_checkpoint), "--repeats", "1", "--context-words", "5",
          "--no-prefix-caching", "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["prefix_cache"]["hits"] == 0 and result["image_cache"]["hits"] > 0
