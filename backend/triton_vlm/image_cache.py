"""vlm's image cache: vision embeddings by image content hash (LRU, bounded in bytes), and the ids clients
give images (`image_uuid`).

A repeated image skips decoding, preprocessing and vision_encoder. The key is a SHA-256 of the image as
sent (the encoded file, or a decoded video frame's pixels): a hit cannot be checked against the pixels,
so the hash must not collide. The same key travels to llm as the image's part of the prefix-cache keys.
An id names a content hash while that hash's embeddings are cached; ids are per server, not per client.
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import NamedTuple

import numpy as np
from PIL import Image

MAX_ID_CHARS = 256


class ImageRef(NamedTuple):
    """One image of a request, keyed: its data (None when only its image_uuid was sent) and that id."""
    key: str
    data: bytes | Image.Image | None
    image_id: str = ""


def content_hash(data: bytes | Image.Image) -> str:
    h = hashlib.sha256()
    if isinstance(data, Image.Image):  # a video frame: its pixels
        h.update(f"pixels {data.mode} {data.width}x{data.height}\n".encode())
        h.update(data.tobytes())
    else:
        h.update(b"file\n")
        h.update(bytes(data))
    return h.hexdigest()


class ImageCache:
    """Thread-safe; `max_bytes` 0 turns it off (nothing is kept, so no id is ever known)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._embeds: OrderedDict[str, np.ndarray] = OrderedDict()  # least recently used first
        self._bytes = 0
        self._ids: dict[str, str] = {}  # client id -> content hash
        self._ids_of: dict[str, set[str]] = {}  # content hash -> its ids, dropped with the hash
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._embeds)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def get(self, key: str) -> np.ndarray | None:
        with self._lock:
            embeds = self._embeds.get(key)
            if embeds is None:
                self.misses += 1
                return None
            self._embeds.move_to_end(key)
            self.hits += 1
            return embeds

    def put(self, key: str, embeds: np.ndarray) -> None:
        """Keep an image's embeddings (read-only from now on), evicting the least recently used to fit."""
        if embeds.nbytes > self.max_bytes:
            return
        embeds.flags.writeable = False  # shared by every request that hits it
        with self._lock:
            if key in self._embeds:
                self._embeds.move_to_end(key)
                return
            while self._bytes + embeds.nbytes > self.max_bytes:
                self._evict()
            self._embeds[key] = embeds
            self._bytes += embeds.nbytes

    def name(self, image_id: str, key: str) -> None:
        """From now on `image_id` stands for the image with this content hash (if its embeddings are cached)."""
        with self._lock:
            if key not in self._embeds:
                return
            old = self._ids.get(image_id)
            if old is not None:
                self._ids_of[old].discard(image_id)
            self._ids[image_id] = key
            self._ids_of.setdefault(key, set()).add(image_id)

    def resolve(self, image_id: str) -> str | None:
        """The content hash an id names, or None if it is unknown or its image was evicted."""
        with self._lock:
            return self._ids.get(image_id)

    def _evict(self) -> None:
        key, embeds = self._embeds.popitem(last=False)
        self._bytes -= embeds.nbytes
        for image_id in self._ids_of.pop(key, ()):
            del self._ids[image_id]

    def check(self) -> None:
        """Assert the byte count, the bound and the id maps agree."""
        with self._lock:
            assert self._bytes == sum(e.nbytes for e in self._embeds.values()), "byte count is off"
            assert self._bytes <= self.max_bytes, "over the bound"
            assert all(key in self._embeds for key in self._ids.values()), "an id names an evicted image"
            assert {(i, k) for k, ids in self._ids_of.items() for i in ids} == set(self._ids.items())
