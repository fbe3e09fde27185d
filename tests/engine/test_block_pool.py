import pytest

from triton_vlm.engine.block_pool import BlockPool, OutOfBlocks


def test_allocate_and_free_round_trip():
    pool = BlockPool(8)
    a, b = pool.allocate(3), pool.allocate(2)
    assert len(set(a) | set(b)) == 5 and pool.num_free == 3
    pool.check([a, b])
    pool.free(a)
    assert pool.num_free == 6
    pool.check([b])
    pool.free(b)
    pool.check([])
    assert pool.num_free == 8


def test_running_out_of_blocks_leaves_pool_unchanged():
    pool = BlockPool(4)
    held = pool.allocate(3)
    with pytest.raises(OutOfBlocks):
        pool.allocate(2)
    assert pool.num_free == 1
    pool.check([held])
    assert pool.allocate(1) and pool.num_free == 0


def test_freed_blocks_are_reused_in_fifo_order():
    pool = BlockPool(3)
    first = pool.allocate(3)
    pool.free([first[1]])
    pool.free([first[0]])
    assert pool.allocate(2) == [first[1], first[0]]


def test_double_free_is_refused():
    pool = BlockPool(2)
    blocks = pool.allocate(1)
    pool.free(blocks)
    with pytest.raises(RuntimeError, match="not referenced"):
        pool.free(blocks)
    pool.check([])


def test_check_catches_a_table_the_pool_does_not_know():
    pool = BlockPool(4)
    held = pool.allocate(1)
    with pytest.raises(AssertionError):
        pool.check([held, [3]])
    with pytest.raises(AssertionError):
        pool.check([])


def test_zero_blocks_is_a_config_error():
    with pytest.raises(ValueError):
        BlockPool(0)
