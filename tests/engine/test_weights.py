"""Decoder weights come from safetensors only: pickle files are never opened, broken files are named."""
from __future__ import annotations

import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from triton_vlm.engine.llama import LlamaForCausalLM
from triton_vlm.engine.weights import decoder_key, load_decoder_weights
from triton_vlm.geometry import ModelGeometry

ROOT = Path(__file__).resolve().parents[2]


class Booby:
    """Unpickling this touches a marker file: proof that someone ran code from a weights file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def fresh_model(checkpoint: Path) -> LlamaForCausalLM:
    return LlamaForCausalLM(ModelGeometry.from_checkpoint(checkpoint).text)


def copy_checkpoint(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    return shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")


def test_a_pickle_file_beside_safetensors_is_never_opened(tiny_checkpoint, tmp_path):
    ckpt = copy_checkpoint(tiny_checkpoint, tmp_path)
    marker = tmp_path / "pwned"
    (ckpt / "pytorch_model.bin").write_bytes(pickle.dumps(Booby(marker)))
    model = fresh_model(ckpt)
    load_decoder_weights(model, ckpt)
    assert not marker.exists()
    params = dict(model.named_parameters())
    checked = 0
    for key, tensor in load_file(ckpt / "model.safetensors").items():
        if decoder_key(key) in params:
            assert torch.equal(params[decoder_key(key)], tensor), key
            checked += 1
    assert checked == len(params)  # every decoder weight came from the safetensors file


def test_a_checkpoint_with_only_pickle_weights_is_refused_by_name(tiny_checkpoint, tmp_path):
    ckpt = copy_checkpoint(tiny_checkpoint, tmp_path)
    marker = tmp_path / "pwned"
    (ckpt / "model.safetensors").unlink()
    (ckpt / "pytorch_model.bin").write_bytes(pickle.dumps(Booby(marker)))
    with pytest.raises(ValueError, match=rf"{re.escape(str(ckpt))}: weights only in pytorch_model.bin; "
                                         r"triton-vlm loads \*.safetensors only, never pickle"):
        load_decoder_weights(fresh_model(ckpt), ckpt)
    assert not marker.exists()


def test_no_weights_at_all_names_the_directory(tiny_checkpoint, tmp_path):
    ckpt = copy_checkpoint(tiny_checkpoint, tmp_path)
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=rf"no \*.safetensors files in {re.escape(str(ckpt))}"):
        load_decoder_weights(fresh_model(ckpt), ckpt)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_broken_safetensors_file_is_named(damage, tiny_checkpoint, tmp_path):
    ckpt = copy_checkpoint(tiny_checkpoint, tmp_path)
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\xde\xad\xbe\xef" * 100, "empty": b""}[damage])
    with pytest.raises(ValueError, match=rf"{re.escape(str(f))}: not a readable safetensors file"):
        load_decoder_weights(fresh_model(ckpt), ckpt)


# Loading code that can execute what a file contains, or code a checkpoint ships.
UNSAFE = re.compile(r"trust_remote_code\s*=\s*True|torch\.load\(|\bpickle\.loads?\(|weights_only\s*=\s*False"
                    r"|allow_pickle\s*=\s*True|^\s*(import|from)\s+(pickle|dill|joblib)\b", re.M)


def test_the_sources_never_unpickle_or_trust_remote_code():
    sources = [p for d in ("backend/triton_vlm", "model_repository", "clients", "scripts")
               for p in (ROOT / d).rglob("*.py")]
    assert len(sources) > 20  # the search really looked at the package
    offenders = [f"{p.relative_to(ROOT)}: {m.group(0).strip()}" for p in sources
                 for m in UNSAFE.finditer(p.read_text())]
    assert offenders == []
