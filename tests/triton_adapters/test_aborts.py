"""The abort board that llm instances share (triton_vlm/triton/aborts.py; this folder is not named
`triton`, which would shadow OpenAI Triton for torch): what one posts, every other sees; old posts go."""
import os
import time

from triton_vlm.triton.aborts import KEEP_S, AbortBoard


def test_a_post_is_seen_through_another_board_on_the_same_directory(tmp_path):
    one, other = AbortBoard(tmp_path / "board"), AbortBoard(tmp_path / "board")
    assert not other.posted("req-1")
    one.post("req-1")
    assert other.posted("req-1") and not other.posted("req-2")


def test_any_request_id_stays_inside_the_board(tmp_path):
    board = AbortBoard(tmp_path / "board")
    for request_id in ("../../escape", "a/b", "", "ü" * 300):
        board.post(request_id)
        assert board.posted(request_id)
    assert {p.parent for p in (tmp_path / "board").iterdir()} == {tmp_path / "board"}
    assert not (tmp_path / "escape").exists()


def test_posts_older_than_keep_s_are_swept_by_the_next_post(tmp_path):
    board = AbortBoard(tmp_path / "board")
    board.post("old")
    entry = next((tmp_path / "board").iterdir())
    past = time.time() - KEEP_S - 1
    os.utime(entry, (past, past))
    board.post("new")
    assert not board.posted("old") and board.posted("new")
