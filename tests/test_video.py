"""Frame sampling with PyAV: evenly spread frames, every input form, clear errors."""
from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from triton_vlm.video import frame_indices, is_video_data_url, sample_frames


def make_video(n_frames: int, size: int = 32, codec: str = "mpeg4") -> bytes:
    """An MP4 whose frame k is a flat grey of level 10 * k: frames are told apart by their colour."""
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=10)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for k in range(n_frames):
            frame = av.VideoFrame.from_ndarray(np.full((size, size, 3), 10 * k, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def level(img: Image.Image) -> int:
    return round(float(np.asarray(img).mean()) / 10)


def test_indices_spread_evenly_with_both_ends():
    assert frame_indices(20, 5) == {0, 5, 10, 14, 19}
    assert frame_indices(3, 8) == {0, 1, 2}
    assert frame_indices(9, 1) == {0}


def test_frames_are_spread_over_the_whole_video():
    frames = sample_frames(make_video(20), n=5)
    assert [level(f) for f in frames] == [0, 5, 10, 14, 19]
    assert all(f.mode == "RGB" and f.size == (32, 32) for f in frames)


def test_a_short_video_gives_all_its_frames():
    assert [level(f) for f in sample_frames(make_video(3))] == [0, 1, 2]


def test_bytes_data_url_and_path_give_the_same_frames(tmp_path):
    data = make_video(12)
    path = tmp_path / "clip.mp4"
    path.write_bytes(data)
    url = "data:video/mp4;base64," + base64.b64encode(data).decode()
    assert is_video_data_url(url)
    expected = [np.asarray(f) for f in sample_frames(data, 4)]
    for source in (url, url.encode(), str(path), path):
        assert [np.asarray(f).tolist() for f in sample_frames(source, 4)] == [e.tolist() for e in expected]


@pytest.mark.parametrize("source, error", [
    (b"not a video at all", r"clip: not a decodable video"),
    (b"", r"clip: empty"),
    ("data:image/png;base64,AAAA", r"clip: malformed data URL"),
    ("data:video/mp4;base64,@@@", r"clip: the data URL's payload is not valid base64"),
    ("/no/such/file.mp4", r"clip: no such file"),
])
def test_bad_videos_are_named(source, error):
    with pytest.raises(ValueError, match=error):
        sample_frames(source, field="clip")


def test_frame_size_is_checked_before_decoding():
    with pytest.raises(ValueError, match=r"clip: 32x32 frames exceed the limit of 1000 pixels"):
        sample_frames(make_video(2), field="clip", max_pixels=1000)


def test_frame_count_is_bounded():
    with pytest.raises(ValueError, match=r"clip: the number of frames must be in \[1, 64\], got 0"):
        sample_frames(make_video(2), n=0, field="clip")
