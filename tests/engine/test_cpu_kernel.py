"""The compiled CPU decode-attention kernel: built once into its cache, switched off or missing cleanly,
and used by the engine, whose greedy output stays that of the torch path."""
from __future__ import annotations

import logging
import shutil

import pytest
import torch

from triton_vlm.engine import cpu_kernel
from triton_vlm.engine.attention import TorchAttention

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                reason="no C compiler here: the compiled decode kernel cannot be built")


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(cpu_kernel, "_loaded", {})
    return tmp_path


def test_built_once_into_a_cache_keyed_by_source_and_cpu(fresh_cache):
    path = cpu_kernel.library_path()
    assert path.parent == fresh_cache / "triton-vlm" / "kernels" and not path.exists()
    assert cpu_kernel.load() is not None and path.exists()
    built = path.stat().st_mtime_ns
    cpu_kernel._loaded.clear()
    assert cpu_kernel.load() is not None and path.stat().st_mtime_ns == built  # loaded, not rebuilt
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no build leftovers


def test_switched_off_or_without_a_compiler_the_torch_path_stays(fresh_cache, monkeypatch, caplog):
    monkeypatch.setenv("TRITON_VLM_CPU_KERNEL", "0")
    assert cpu_kernel.load() is None
    monkeypatch.delenv("TRITON_VLM_CPU_KERNEL")
    monkeypatch.setenv("CC", str(fresh_cache / "no-such-compiler"))
    with caplog.at_level(logging.WARNING):
        assert cpu_kernel.load() is None
    assert "using the torch path" in caplog.text
    backend = TorchAttention(8, torch.device("cpu"))
    backend.kv_cache(1, 4, 2, 8, torch.float32)
    assert backend.kernel is None


def test_only_fp32_on_cpu_uses_it():
    backend = TorchAttention(8, torch.device("cpu"))
    backend.kv_cache(1, 4, 2, 8, torch.bfloat16)
    assert backend.kernel is None
    backend.kv_cache(1, 4, 2, 8, torch.float32)
    assert backend.kernel is not None


def test_engine_greedy_output_is_the_torch_paths(tiny_checkpoint, monkeypatch):
    from triton_vlm.engine.config import EngineConfig
    from triton_vlm.engine.llm_engine import LLMEngine
    from triton_vlm.engine.sampling_params import SamplingParams

    prompts = [[1, 5, 9, 14, 2, 7] * k for k in (1, 3, 7, 12)]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    outputs = {}
    for use in ("1", "0"):
        monkeypatch.setenv("TRITON_VLM_CPU_KERNEL", use)
        engine = LLMEngine(str(tiny_checkpoint), EngineConfig(block_size=4, num_kv_blocks=128))
        assert (engine.runner.attention.kernel is not None) == (use == "1")
        outputs[use] = engine.generate(prompts, params)
        engine.check()
    assert outputs["1"] == outputs["0"]
