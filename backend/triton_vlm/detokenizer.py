"""Incremental detokenisation: turn a growing list of token ids into text deltas.

Decoding a window of recent tokens (not the whole output) keeps each step cheap; text that
ends in an incomplete UTF-8 sequence is held back until the next token completes it.
"""
from __future__ import annotations

REPLACEMENT = "\ufffd"


class Detokenizer:
    def __init__(self, tokenizer, skip_special_tokens: bool = True, spaces_between_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.spaces = spaces_between_special_tokens  # honoured by slow tokenizers, as in vLLM
        self.ids: list[int] = []
        self.prefix_offset = 0  # window start: enough left context to decode spacing right
        self.read_offset = 0  # ids before this are already in the emitted text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip, clean_up_tokenization_spaces=False,
                                     spaces_between_special_tokens=self.spaces)

    def peek(self, token: int) -> str:
        """The text `token` would add next (with anything held back), without adding it."""
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        return self._decode(self.ids[self.prefix_offset:] + [token])[len(prefix):]

    def add(self, new_ids: list[int]) -> str:
        """Append ids; return the text they complete (possibly empty)."""
        self.ids.extend(new_ids)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith(REPLACEMENT):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full[len(prefix):]
        return ""

    def flush(self) -> str:
        """At the end of generation, release whatever is still held back."""
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix):]
