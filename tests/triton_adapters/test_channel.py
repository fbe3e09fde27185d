"""The llm -> vlm socket channel: frames arrive in order per request, a lost llm is reported."""
import queue
import socket
import threading

import pytest

from triton_vlm.triton.channel import LOST, Listener, Sender, read_frame, write_frame


@pytest.fixture
def listener():
    listener = Listener()
    yield listener
    listener.stop()


def test_messages_reach_their_own_request_in_order(listener):
    a, b = listener.open("a"), listener.open("b")
    sender = Sender(listener.path, on_lost=lambda rid: None)
    for i in range(50):
        sender.send({"id": "a" if i % 2 else "b", "n": i})
    sender.send({"id": "gone", "n": -1})  # a request vlm has closed: dropped
    got_a = [a.get(timeout=5)["n"] for _ in range(25)]
    got_b = [b.get(timeout=5)["n"] for _ in range(25)]
    assert got_a == list(range(1, 50, 2)) and got_b == list(range(0, 50, 2))
    sender.stop()


def test_a_closed_connection_fails_the_requests_it_spoke_for(listener):
    heard, silent = listener.open("heard"), listener.open("silent")
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(listener.path)
    write_frame(conn, {"id": "heard", "text": "x"})
    assert heard.get(timeout=5)["text"] == "x"
    conn.close()  # the llm stub died
    assert heard.get(timeout=5) == {"id": "heard", "error": LOST}
    with pytest.raises(queue.Empty):  # never heard from that llm: the watchdog's ping decides
        silent.get(timeout=0.3)


def test_an_unreachable_vlm_reports_each_lost_message(tmp_path):
    lost = queue.SimpleQueue()
    sender = Sender(str(tmp_path / "nobody.sock"), on_lost=lost.put)
    sender.send({"id": "r1"})
    sender.send({"id": "r2"})
    assert [lost.get(timeout=5), lost.get(timeout=5)] == ["r1", "r2"]
    sender.stop()


def test_the_socket_is_private_and_removed_on_stop():
    import os
    import stat

    listener = Listener()
    directory = os.path.dirname(listener.path)
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    listener.stop()
    assert not os.path.exists(directory)


def test_frames_round_trip_and_end_cleanly():
    left, right = socket.socketpair()
    write_frame(left, {"id": "x", "ids": [1, 2], "logprobs": [{"5": {"logprob": float("-inf")}}]})
    left.close()
    with right.makefile("rb") as stream:
        message = read_frame(stream)
        assert message["ids"] == [1, 2] and message["logprobs"][0]["5"]["logprob"] == float("-inf")
        assert read_frame(stream) is None
    right.close()


def test_a_reader_that_never_reads_does_not_block_the_sender(tmp_path):
    stuck = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # listens, never accepts or reads
    stuck.bind(str(tmp_path / "stuck.sock"))
    stuck.listen(1)
    sender = Sender(str(tmp_path / "stuck.sock"), on_lost=lambda rid: None)
    done = threading.Event()

    def flood():  # far more than the socket buffers hold
        for _ in range(20000):
            sender.send({"id": "r", "text": "y" * 1000})
        done.set()

    threading.Thread(target=flood, daemon=True).start()
    assert done.wait(10), "send() blocked on a reader that does not read"
    stuck.close()
