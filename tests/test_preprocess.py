import base64
import io

import numpy as np
import pytest
from PIL import Image

from triton_vlm.preprocess import Preprocessor, decode_image


def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP"])
def test_decodes_common_formats_as_rgb(fmt):
    img = Image.new("RGB", (20, 10), (200, 30, 40))
    out = decode_image(encode(img, fmt))
    assert out.mode == "RGB" and out.size == (20, 10)


def test_base64_and_data_url_give_the_same_pixels():
    raw = encode(Image.new("RGBA", (8, 8), (1, 2, 3, 128)), "PNG")
    b64 = base64.b64encode(raw)
    a, b, c = (np.asarray(decode_image(x)) for x in (raw, b64, b"data:image/png;base64," + b64))
    assert (a == b).all() and (a == c).all() and a.shape == (8, 8, 3)


@pytest.mark.parametrize("data,message", [
    (b"", "image: empty"),
    (b"hello world", "image: not a decodable image"),
    (base64.b64encode(b"hello world"), "image: base64 decoded but is not a decodable image"),
    (encode(Image.new("RGB", (64, 64)), "PNG")[:60], "image: .*not a decodable image"),
])
def test_bad_images_name_the_field(data, message):
    with pytest.raises(ValueError, match=message):
        decode_image(data, "image")


def test_pixels_and_ids_match_the_hf_processor(tiny_checkpoint, photos):
    from transformers import AutoProcessor

    pre = Preprocessor(tiny_checkpoint)
    hf = AutoProcessor.from_pretrained(tiny_checkpoint)
    prompt = "USER: <image>\n<image>\nCompare.\nASSISTANT:"
    images = [decode_image(photos["chelsea"]), decode_image(photos["astronaut"])]
    ref = hf(text=prompt, images=images, return_tensors="np")
    np.testing.assert_allclose(pre.pixel_values(images), ref["pixel_values"], atol=1e-5, rtol=0)
    assert pre.input_ids(prompt) == ref["input_ids"][0].tolist()
    assert pre.count_placeholders(prompt) == 2
