from transformers import AutoTokenizer

from triton_vlm.detokenizer import Detokenizer


def test_deltas_concatenate_to_the_full_decode(tiny_checkpoint):
    tok = AutoTokenizer.from_pretrained(tiny_checkpoint)
    text = "Hello wörld — a café 🐱 says: miaow!"
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    detok = Detokenizer(tok)
    pieces = [detok.add([i]) for i in ids] + [detok.flush()]
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True) == text
    assert all("\ufffd" not in p for p in pieces)  # split characters are held back, never sent broken


def test_random_ids_match_decode_even_when_bytes_are_invalid(tiny_checkpoint):
    import random

    tok = AutoTokenizer.from_pretrained(tiny_checkpoint)
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(len(tok)) for _ in range(30)]
        detok = Detokenizer(tok)
        chunks = [detok.add(ids[i:i + 3]) for i in range(0, len(ids), 3)]
        assert "".join(chunks) + detok.flush() == tok.decode(ids, skip_special_tokens=True)
