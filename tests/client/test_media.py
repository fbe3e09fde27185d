"""Image forms become the bytes the server decodes; URLs are fetched with a size cap and a timeout."""
from __future__ import annotations

import base64
import http.server
import io
import threading

import numpy as np
import pytest
from PIL import Image

from triton_vlm.client import media


def picture() -> Image.Image:
    return Image.fromarray(np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3) * 3)


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.fixture(scope="module")
def http_root(tmp_path_factory):
    """(base URL, directory) of a local HTTP server over a temporary directory."""
    root = tmp_path_factory.mktemp("www")
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(root))  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", root
    server.shutdown()


def test_every_image_form_carries_the_same_pixels(tmp_path, http_root):
    img = picture()
    encoded = media.png(img)
    path = tmp_path / "p.png"
    path.write_bytes(encoded)
    base, root = http_root
    (root / "p.png").write_bytes(encoded)
    data_url = "data:image/png;base64," + base64.b64encode(encoded).decode()
    for form in (img, np.asarray(img), encoded, str(path), path, f"{base}/p.png"):
        assert np.array_equal(pixels(media.image_bytes(form)), np.asarray(img)), type(form)
    assert media.image_bytes(data_url) == data_url.encode()  # the server decodes data: URLs itself


def test_bad_images_name_the_field(tmp_path, http_root):
    base, root = http_root
    (root / "big.bin").write_bytes(b"x" * 1000)
    with pytest.raises(ValueError, match=r"^img\[2\]: cannot read .*missing.png"):
        media.image_bytes(str(tmp_path / "missing.png"), "img[2]")
    with pytest.raises(ValueError, match=r"^image: .*big.bin is 1000 bytes, over the limit of 999"):
        media.image_bytes(f"{base}/big.bin", max_bytes=999)
    with pytest.raises(ValueError, match=r"^image: cannot fetch .*nothing-here"):
        media.image_bytes(f"{base}/nothing-here.png")
    with pytest.raises(ValueError, match=r"^image: expected a PIL image.*got int"):
        media.image_bytes(7)
    with pytest.raises(ValueError, match=r"^image: expected a uint8 array of shape HxWx3"):
        media.image_bytes(np.zeros((4, 4), np.uint8))


def test_fetch_gives_up_after_its_timeout():
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()  # accepts the connection, never answers
    try:
        with pytest.raises(ValueError, match="cannot fetch"):
            media.fetch(f"http://127.0.0.1:{listener.getsockname()[1]}/x.png", timeout=0.5)
    finally:
        listener.close()
