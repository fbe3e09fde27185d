import numpy as np
from PIL import Image

from triton_vlm.image_cache import ImageCache, content_hash


def rows(n: int, value: float = 0.0) -> np.ndarray:
    return np.full((n, 4), value, dtype=np.float32)  # 16 bytes a row


def test_lru_bounded_in_bytes():
    cache = ImageCache(max_bytes=3 * 64)
    for key in "abc":
        cache.put(key, rows(4))
    assert cache.get("a") is not None  # now the most recently used
    cache.put("d", rows(4))  # evicts b, the least recently used
    assert cache.get("b") is None and cache.get("c") is not None and cache.get("d") is not None
    assert cache.nbytes == 3 * 64 and len(cache) == 3
    cache.put("huge", rows(100))  # larger than the whole cache: not kept, nothing evicted
    assert cache.get("huge") is None and len(cache) == 3
    assert (cache.hits, cache.misses) == (3, 2)
    cache.check()


def test_cached_embeddings_are_read_only():
    cache = ImageCache(max_bytes=1024)
    cache.put("a", rows(2))
    assert not cache.get("a").flags.writeable


def test_ids_name_a_cached_image_until_it_is_evicted():
    cache = ImageCache(max_bytes=2 * 64)
    cache.name("tenant/cat", "a")  # not cached: the id stays unknown
    assert cache.resolve("tenant/cat") is None
    cache.put("a", rows(4))
    cache.name("tenant/cat", "a")
    assert cache.resolve("tenant/cat") == "a"
    cache.put("b", rows(4))
    cache.name("tenant/cat", "b")  # re-sent with another image: the id follows it
    cache.name("other", "a")
    assert cache.resolve("tenant/cat") == "b"
    cache.put("c", rows(4))  # evicts a, and the id naming it
    assert cache.resolve("other") is None and cache.resolve("tenant/cat") == "b"
    cache.check()


def test_off_keeps_nothing():
    cache = ImageCache(max_bytes=0)
    cache.put("a", rows(1))
    cache.name("id", "a")
    assert cache.get("a") is None and cache.resolve("id") is None
    cache.check()


def test_content_hash_tells_files_and_frames_apart():
    frame = Image.new("RGB", (2, 2), (1, 2, 3))
    same = Image.new("RGB", (2, 2), (1, 2, 3))
    assert content_hash(frame) == content_hash(same) != content_hash(Image.new("RGB", (2, 2), (1, 2, 4)))
    assert content_hash(b"abc") == content_hash(b"abc") != content_hash(b"abd")
    assert content_hash(frame.tobytes()) != content_hash(frame)  # a file's bytes never pass for pixels
    assert len(content_hash(b"")) == 64  # SHA-256
