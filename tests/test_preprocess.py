import base64
import io
import socket
import struct
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from triton_vlm.preprocess import DEFAULT_MAX_IMAGE_PIXELS, Preprocessor, decode_image

SUPPORTED = r"supported: PNG, JPEG, WebP, GIF, BMP, TIFF"
rng = np.random.default_rng(0)
NOISE = rng.integers(0, 256, (23, 37, 3), dtype=np.uint8)  # 37x23: odd sizes, every pixel different
ALPHA = rng.integers(0, 256, (23, 37), dtype=np.uint8)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def zero_png(width: int, height: int, extra_chunks: bytes = b"") -> bytes:
    """A valid 1-bit grey PNG of an all-black image, compressed 1 MB of rows at a time: 20000x20000 is ~50 KB."""
    row = bytes(1 + (width + 7) // 8)  # filter byte + packed bits
    rows_per_block = max(1, (1 << 20) // len(row))
    z, idat, left = zlib.compressobj(9), [], height
    while left:
        n = min(left, rows_per_block)
        idat.append(z.compress(row * n))
        left -= n
    idat.append(z.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + extra_chunks + chunk(b"IDAT", b"".join(idat))
            + chunk(b"IEND", b""))


def data_url(raw: bytes, header: bytes = b"data:image/png;base64") -> bytes:
    return header + b"," + base64.b64encode(raw)


@pytest.fixture(scope="module")
def pre(tiny_checkpoint) -> Preprocessor:
    return Preprocessor(tiny_checkpoint)


@pytest.fixture(scope="module")
def hf_pixels(tiny_checkpoint):
    """pixel_values from the checkpoint's HF processor, given the PIL image as HF users pass it."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    return lambda img: processor(text="USER: <image>\nWhat?", images=[img], return_tensors="np")["pixel_values"]


# ---- formats and transports ----

@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF"])
def test_decodes_common_formats_as_rgb(fmt):
    img = Image.new("RGB", (20, 10), (200, 30, 40))
    out = decode_image(encode(img, fmt))
    assert out.mode == "RGB" and out.size == (20, 10)
    assert out.getpixel((3, 3)) == pytest.approx((200, 30, 40), abs=8)  # JPEG/WebP/GIF are lossy


def test_multi_picture_jpeg_decodes_its_first_picture():
    first, second = Image.new("RGB", (16, 8), (250, 0, 0)), Image.new("RGB", (16, 8), (0, 0, 250))
    raw = encode(first, "MPO", save_all=True, append_images=[second])
    assert Image.open(io.BytesIO(raw)).format == "MPO"
    assert decode_image(raw).getpixel((4, 4)) == pytest.approx((250, 0, 0), abs=8)


def test_base64_and_data_url_give_the_same_pixels():
    raw = encode(Image.fromarray(NOISE), "PNG")
    b64 = base64.b64encode(raw)
    forms = [raw, b64, base64.encodebytes(raw),  # line-wrapped at 76 columns
             data_url(raw), data_url(raw, b"DATA:IMAGE/PNG;BASE64"), data_url(raw, b"data:image/png;name=a.png;base64"),
             data_url(raw, b"data:image/jpeg;base64")]  # the declared subtype need not match: the bytes decide
    for form in forms:
        np.testing.assert_array_equal(np.asarray(decode_image(form)), NOISE)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF"])
def test_one_pixel_images_decode_and_preprocess(fmt, pre, hf_pixels):
    raw = encode(Image.new("RGB", (1, 1), (10, 200, 30)), fmt)
    for form in (raw, base64.b64encode(raw)):
        img = decode_image(form, "image[0]")
        assert img.size == (1, 1)
        np.testing.assert_array_equal(pre.pixel_values([img]), hf_pixels(Image.open(io.BytesIO(raw))))


# ---- decompression bombs ----

def test_png_bomb_is_refused_from_its_header_before_any_pixel_is_decoded(monkeypatch):
    bomb = zero_png(20000, 20000)  # 400 M pixels; PIL alone would raise DecompressionBombError
    assert len(bomb) < 200_000
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("pixels were decoded"))
    message = r"^image\[0\]: 20000x20000 pixels exceeds the limit of 16777216 \(max_image_pixels\)$"
    for form in (bomb, base64.b64encode(bomb), data_url(bomb)):
        with pytest.raises(ValueError, match=message):
            decode_image(form, "image[0]")


@pytest.mark.filterwarnings("error")  # PIL would warn (DecompressionBombWarning) above 89 M pixels
def test_pil_limit_does_not_decide_ours_does():
    with pytest.raises(ValueError, match=r"^image\[2\]: 10000x10000 pixels exceeds the limit of 16777216 "):
        decode_image(zero_png(10000, 10000), "image[2]")
    assert DEFAULT_MAX_IMAGE_PIXELS == 16777216
    # A caller's larger limit is honoured: 9600x9600 (92 M, over PIL's warning limit) passes the header check
    # under 10**8 and goes on to decoding (cut short here, to stay cheap).
    with pytest.raises(ValueError, match=r"^image\[2\]: not a decodable image \(truncated or corrupt PNG: image file is "
                                         r"truncated"):
        decode_image(zero_png(9600, 9600)[:200], "image[2]", max_pixels=10**8)


def test_max_pixels_boundary():
    raw = zero_png(100, 100)
    assert decode_image(raw, max_pixels=10_000).size == (100, 100)
    with pytest.raises(ValueError, match=r"^image: 100x100 pixels exceeds the limit of 9999 \(max_image_pixels\)$"):
        decode_image(raw, max_pixels=9_999)


def test_gif_whose_first_frame_outgrows_its_screen_is_refused():
    # Logical screen 1x1, first frame 20000x20000: PIL grows the canvas while reading the header.
    gif = (b"GIF89a" + struct.pack("<HHBBB", 1, 1, 0, 0, 0) + b"," + struct.pack("<HHHHB", 0, 0, 20000, 20000, 0)
           + b"\x02\x02\x4c\x01\x00;")
    with pytest.raises(ValueError, match=r"^image\[0\]: 20000x20000 pixels exceeds the limit"):
        decode_image(gif, "image[0]")


def test_webp_canvas_bomb_is_refused():
    frames = [Image.new("RGB", (4, 4), c) for c in ("red", "blue")]
    webp = bytearray(encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True))
    assert webp[12:16] == b"VP8X"
    webp[24:30] = (16382).to_bytes(3, "little") * 2  # canvas 16383x16383 (the VP8X fields hold size - 1)
    with pytest.raises(ValueError, match=r"^image\[0\]: 16383x16383 pixels exceeds the limit"):
        decode_image(bytes(webp), "image[0]")


def test_elongated_image_is_refused_before_the_processor_resizes_it(pre, hf_pixels):
    # shortest_edge 32: 2x300 becomes 32x4800; 1x20000 would become 32x640000 = 20480000 pixels.
    fine = Image.fromarray(rng.integers(0, 256, (300, 2, 3), dtype=np.uint8))
    np.testing.assert_array_equal(pre.pixel_values([fine]), hf_pixels(fine))
    thin = decode_image(zero_png(20000, 1))
    with pytest.raises(ValueError, match=r"^image\[1\]: 20000x1 pixels would be resized to 20480000 pixels "
                                         r"\(shortest edge 32\), which exceeds the limit of 16777216 "
                                         r"\(max_image_pixels\)$"):
        pre.pixel_values([fine, thin])
    with pytest.raises(ValueError, match=r"^image\[0\]: 2x300 pixels would be resized to 153600 pixels"):
        pre.pixel_values([fine], max_pixels=153_599)


# ---- URLs are never fetched ----

@pytest.mark.parametrize("url", [b"http://127.0.0.1:9/cat.png", b"HTTPS://example.com/cat.png", b"ftp://host/a.png",
                                 b"  https://example.com/a.png", b"s3://bucket/a.png"])
def test_urls_are_refused(url):
    with pytest.raises(ValueError, match=r"^image\[0\]: URLs are not fetched by this server; send the image bytes, "
                                         r"base64 or a data: URL$"):
        decode_image(url, "image[0]")


def test_file_url_to_a_real_image_is_refused_without_touching_files_or_network(tmp_path, monkeypatch):
    path = tmp_path / "cat.png"
    path.write_bytes(encode(Image.fromarray(NOISE), "PNG"))
    url = f"file://{path}".encode()

    def forbidden(*args, **kwargs):
        raise AssertionError(f"decode_image touched a file or the network: {args}")

    monkeypatch.setattr("builtins.open", forbidden)
    monkeypatch.setattr(io, "open", forbidden)
    monkeypatch.setattr(socket, "socket", forbidden)
    monkeypatch.setattr(socket, "create_connection", forbidden)
    try:
        with pytest.raises(ValueError, match=r"^image\[0\]: URLs are not fetched"):
            decode_image(url, "image[0]")
        with pytest.raises(ValueError, match=r"^image\[0\]: URLs are not fetched"):
            decode_image(b"FILE://" + str(path).encode(), "image[0]")
    finally:
        monkeypatch.undo()


# ---- data: URL headers ----

@pytest.mark.parametrize("data,header,problem", [
    (b"data:text/plain;base64,aGVsbG8=", "data:text/plain;base64", "the media type is not image/\\*"),
    (b"data:;base64,aGVsbG8=", "data:;base64", "the media type is not image/\\*"),
    (b"data:image/png,aGVsbG8=", "data:image/png", "the payload is not marked ;base64"),
    (b"data:image/png;charset=x,aGVsbG8=", "data:image/png;charset=x", "the payload is not marked ;base64"),
    (b"data:image/png;base64", "data:image/png;base64", "no ',' before the payload"),
])
def test_malformed_data_url_header(data, header, problem):
    with pytest.raises(ValueError, match=rf"^image\[0\]: malformed data URL header '{header}' \({problem}\); "
                                         r"expected data:image/<type>;base64,<payload>$"):
        decode_image(data, "image[0]")


def test_data_url_header_in_the_message_is_cut_short():
    with pytest.raises(ValueError, match=r"malformed data URL header 'data:xxxx+' \(no ','") as info:
        decode_image(b"data:" + b"x" * 100_000, "image[0]")
    assert len(str(info.value)) < 200


# ---- bad bytes get named errors ----

PNG = encode(Image.fromarray(NOISE).resize((64, 64)), "PNG")
JPEG = encode(Image.fromarray(NOISE).resize((64, 64)), "JPEG")
IDAT = PNG.index(b"IDAT")
NOT_IMAGE = r"^image\[0\]: not a decodable image "


BAD = {
    "empty": (b"", r"^image\[0\]: empty$"),
    "blank": (b" \r\n", r"^image\[0\]: empty$"),
    "text": (b"hello world", NOT_IMAGE + rf"\(neither a supported image file nor base64 of one; {SUPPORTED}\)$"),
    "base64-text": (base64.b64encode(b"hello world"),
                    NOT_IMAGE + rf"\(base64 decoded, but not to a supported image file; {SUPPORTED}\)$"),
    "ico": (encode(Image.new("RGB", (8, 8)), "ICO"), NOT_IMAGE + r"\(neither a supported image file"),
    "zero-width-png": (zero_png(0, 5), NOT_IMAGE + r"\(neither a supported image file"),
    "data-url-text": (data_url(b"hello"),
                      NOT_IMAGE + rf"\(the data URL's payload is not a supported image file; {SUPPORTED}\)$"),
    "data-url-bad-base64": (b"data:image/png;base64,iVBOR!!",
                            NOT_IMAGE + r"\(the data URL's payload is not valid base64\)$"),
    "png-header-cut": (PNG[:20], NOT_IMAGE + r"\(truncated or corrupt header: "),
    "png-cut-60": (PNG[:60], NOT_IMAGE + r"\(truncated or corrupt PNG: "),
    "png-cut-60-base64": (base64.b64encode(PNG[:60]), NOT_IMAGE + r"\(truncated or corrupt PNG sent as base64: "),
    "png-cut-60-data-url": (data_url(PNG[:60]), NOT_IMAGE + r"\(truncated or corrupt PNG in a data URL: "),
    "png-cut-half": (PNG[:len(PNG) // 2], NOT_IMAGE + r"\(truncated or corrupt PNG: "),
    "png-zeroed-idat": (PNG[:IDAT + 4] + bytes(200) + PNG[IDAT + 204:],
                        NOT_IMAGE + r"\(truncated or corrupt PNG: broken data stream"),
    "jpeg-cut-half": (JPEG[:len(JPEG) // 2], NOT_IMAGE + r"\(truncated or corrupt JPEG: image file is truncated"),
    "jpeg-cut-half-base64": (base64.b64encode(JPEG[:len(JPEG) // 2]),
                             NOT_IMAGE + r"\(truncated or corrupt JPEG sent as base64: image file is truncated"),
    "jpeg-header-cut": (JPEG[:300], NOT_IMAGE + r"\(truncated or corrupt header: "),
    # A zTXt chunk inflating to 2 MB: PIL's own text-chunk limit trips while reading the header.
    "png-text-bomb": (zero_png(8, 8, chunk(b"zTXt", b"Comment\0\0" + zlib.compress(bytes(2 << 20)))),
                      NOT_IMAGE + r"\(truncated or corrupt header: Decompressed data too large"),
}


@pytest.mark.parametrize("data,message", BAD.values(), ids=BAD.keys())
def test_bad_images_name_the_field(data, message):
    with pytest.raises(ValueError, match=message):
        decode_image(data, "image[0]")


SAMPLES = [encode(Image.fromarray(NOISE[:8, :8]), fmt) for fmt in ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")]


@pytest.mark.filterwarnings("ignore::UserWarning")  # PIL warns about some of the corrupt TIFF tags
@settings(max_examples=300, deadline=None)
@given(st.sampled_from(SAMPLES), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4),
       st.integers(0, 10_000), st.booleans())
def test_corrupted_files_decode_or_raise_a_named_value_error(raw, flips, cut, as_base64):
    data = bytearray(raw[:max(1, cut)])
    for at, value in flips:
        data[at % len(data)] = value
    data = base64.b64encode(bytes(data)) if as_base64 else bytes(data)
    try:
        img = decode_image(data, "image[3]", max_pixels=1 << 16)
    except ValueError as e:
        assert str(e).startswith("image[3]: ")
    else:
        assert img.mode == "RGB" and img.width * img.height <= 1 << 16


# ---- every pixel mode becomes the RGB image HF's processor makes of it ----

def _with_alpha(mode: str) -> Image.Image:
    return Image.merge("RGBA", (*Image.fromarray(NOISE).split(), Image.fromarray(ALPHA))).convert(mode)


# A solid patch in the middle, so that a transparent key colour covers pixels the processor's centre crop keeps.
PATCHED = NOISE.copy()
PATCHED[6:18, 10:28] = (12, 34, 56)


def _keyed(mode: str, fmt: str) -> bytes:
    img = Image.fromarray(PATCHED).convert(mode, dither=Image.Dither.NONE)  # the patch stays one palette index
    return encode(img, fmt, transparency=img.getpixel((15, 10)))


# (name, encoded file, the mode PIL opens it in, whether convert_to_rgb composites it onto white)
MODES = [
    ("L", encode(Image.fromarray(NOISE).convert("L"), "PNG"), "L", False),
    ("LA", encode(_with_alpha("LA"), "PNG"), "LA", True),
    ("RGBA", encode(_with_alpha("RGBA"), "PNG"), "RGBA", True),
    ("RGBA-webp", encode(_with_alpha("RGBA"), "WEBP", lossless=True), "RGBA", True),
    ("LA-tiff", encode(_with_alpha("LA"), "TIFF"), "LA", True),
    ("P", encode(Image.fromarray(NOISE).convert("P"), "PNG"), "P", False),
    ("P-transparent", _keyed("P", "PNG"), "P", True),
    ("P-alpha-palette", encode(_with_alpha("RGBA").quantize(64, method=Image.Quantize.FASTOCTREE), "PNG"), "P", True),
    ("P-gif-transparent", _keyed("P", "GIF"), "P", True),
    ("L-key", _keyed("L", "PNG"), "L", True),
    ("RGB-key", _keyed("RGB", "PNG"), "RGB", True),
    ("1", encode(Image.fromarray(NOISE).convert("1"), "PNG"), "1", False),
    ("1-tiff", encode(Image.fromarray(NOISE).convert("1"), "TIFF"), "1", False),
    ("CMYK-jpeg", encode(Image.fromarray(NOISE).convert("CMYK"), "JPEG"), "CMYK", False),
    ("CMYK-tiff", encode(Image.fromarray(NOISE).convert("CMYK"), "TIFF"), "CMYK", False),
    ("YCbCr-tiff", encode(Image.fromarray(NOISE).convert("YCbCr"), "TIFF"), "YCbCr", False),
    ("LAB-tiff", encode(Image.fromarray(NOISE).convert("LAB"), "TIFF"), "LAB", False),
    # 32-bit integer and float: no natural 8-bit scale exists; we do what HF does (clip to 0..255).
    ("I-tiff", encode(Image.fromarray(rng.integers(-300, 700, (23, 37), dtype=np.int32)), "TIFF"), "I", False),
    ("F-tiff", encode(Image.fromarray(rng.uniform(-50, 400, (23, 37)).astype(np.float32)), "TIFF"), "F", False),
]


@pytest.mark.parametrize("name,raw,mode,composited", MODES, ids=[m[0] for m in MODES])
def test_every_mode_preprocesses_exactly_as_the_hf_processor(name, raw, mode, composited, pre, hf_pixels):
    assert Image.open(io.BytesIO(raw)).mode == mode
    ours = decode_image(raw, "image[0]")
    assert ours.mode == "RGB" and "transparency" not in ours.info
    reference = hf_pixels(Image.open(io.BytesIO(raw)))
    np.testing.assert_array_equal(pre.pixel_values([ours]), reference)
    # The transparent cases really test compositing: the same pixels with the alpha (or key) dropped differ.
    naive = pre.pixel_values([Image.fromarray(np.asarray(Image.open(io.BytesIO(raw)).convert("RGBA"))[..., :3])])
    assert np.array_equal(naive, reference) != composited


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_grey_keeps_its_high_byte_where_hf_would_clip(fmt, pre, hf_pixels):
    # HF's convert_to_rgb clips 16-bit values above 255 to white, so a 16-bit photo would arrive all but blank.
    # We keep the high byte, as PIL itself reads 16-bit RGB(A) PNGs; the processor then sees that 8-bit image.
    wide = rng.integers(0, 65536, (23, 37), dtype=np.uint16)
    raw = encode(Image.fromarray(wide), fmt)
    assert Image.open(io.BytesIO(raw)).mode == "I;16"
    ours = decode_image(raw)
    np.testing.assert_array_equal(np.asarray(ours), np.repeat((wide >> 8).astype(np.uint8)[..., None], 3, axis=2))
    np.testing.assert_array_equal(pre.pixel_values([ours]), hf_pixels(Image.fromarray((wide >> 8).astype(np.uint8))))
    assert not np.array_equal(pre.pixel_values([ours]), hf_pixels(Image.open(io.BytesIO(raw))))


def test_16_bit_grey_transparent_key_stays_transparent():
    wide = rng.integers(0, 65536, (23, 37), dtype=np.uint16)
    key = int(wide[4, 4])
    out = np.asarray(decode_image(encode(Image.fromarray(wide), "PNG", transparency=key)))[..., 0]
    expected = np.where(wide == key, 255, wide >> 8)  # transparent: the white background, as HF composites
    np.testing.assert_array_equal(out, expected)


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


def test_placeholders_of_two_kinds_expand_in_order():
    from triton_vlm.preprocess import expand_placeholders

    tokens = ("<|image_pad|>", "<|video_pad|>")
    assert expand_placeholders("a<|video_pad|>b<|image_pad|>c", tokens, [2, 3]) == \
        "a" + "<|video_pad|>" * 2 + "b" + "<|image_pad|>" * 3 + "c"
    with pytest.raises(ValueError, match=r"^2 <\|image_pad\|>/<\|video_pad\|> placeholder\(s\) for 1 image"):
        expand_placeholders("<|image_pad|><|video_pad|>", tokens, [1])
