import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


# ---- prefix caching --------------------------------------------------------------------------------------
def test_a_freed_cached_block_stays_reusable_until_needed():
    pool = BlockPool(4)
    table = pool.allocate(2)
    pool.cache(table[0], b"h0")
    pool.free(table)
    assert pool.num_free == 4 and pool.lookup([b"h0", b"h1"]) == [table[0]]
    pool.check([])
    # Plain free blocks are handed out before a cached one is evicted.
    others = pool.allocate(3)
    assert table[0] not in others and pool.lookup([b"h0"]) == [table[0]]
    pool.reuse([table[0]])  # taken back from the cached free list
    assert pool.num_free == 0
    pool.check([others, [table[0]]])


def test_reuse_of_a_block_in_use_shares_it():
    pool = BlockPool(2)
    a = pool.allocate(1)
    pool.cache(a[0], b"h")
    pool.reuse(pool.lookup([b"h"]))
    assert pool.ref_counts[a[0]] == 2 and pool.num_free == 1
    pool.check([a, a])


def test_eviction_is_least_recently_used_and_tails_first():
    pool = BlockPool(6)
    first, second = pool.allocate(3), pool.allocate(3)
    for table, name in ((first, b"a"), (second, b"b")):
        for i, b in enumerate(table):
            pool.cache(b, name + bytes([i]))
    pool.free(first)  # freed earlier: evicted first, its tail before its head
    pool.free(second)
    assert pool.allocate(4) == [first[2], first[1], first[0], second[2]]
    assert pool.lookup([b"a\x00"]) == [] and pool.lookup([b"b\x00", b"b\x01", b"b\x02"]) == second[:2]
    pool.check([[first[2], first[1], first[0], second[2]]])


def test_a_hash_cached_twice_keeps_its_first_block():
    pool = BlockPool(2)
    a, b = pool.allocate(1), pool.allocate(1)
    pool.cache(a[0], b"same")
    pool.cache(b[0], b"same")  # computed at the same time by another request
    assert pool.lookup([b"same"]) == a and pool.block_hash[b[0]] is None
    pool.free(b)
    pool.free(a)
    assert list(pool.plain_free) == b and list(pool.cached_free) == a
    pool.check([])


def test_misuse_is_refused():
    pool = BlockPool(2)
    a = pool.allocate(1)
    with pytest.raises(RuntimeError, match="not cached"):
        pool.reuse(a)
    with pytest.raises(RuntimeError, match="not allocated"):
        pool.cache(1, b"h")
    pool.check([a])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["alloc", "free", "cache", "hit"]), st.integers(0, 7), st.integers(1, 4)),
                max_size=60))
def test_random_operations_keep_the_invariants(ops):
    """Tables are allocated, cached (as full computed blocks: hashes of a table's own prefix), freed tail
    first and found again; the pool agrees with the tables after every operation."""
    pool = BlockPool(8)
    tables: list[tuple[list[int], list[bytes]]] = []  # each table with the hashes of its blocks
    for op, pick, n in ops:
        if op == "alloc" and n <= pool.num_free:
            blocks = pool.allocate(n)
            tables.append((blocks, [bytes([pick, i, len(tables)]) for i in range(n)]))
        elif op == "free" and tables:
            blocks, _ = tables.pop(pick % len(tables))
            pool.free(blocks)
        elif op == "cache" and tables:
            blocks, hashes = tables[pick % len(tables)]
            for b, h in zip(blocks, hashes):
                pool.cache(b, h)
        elif op == "hit":
            wanted = [h for _, hs in tables for h in hs][:n] or [bytes([pick, 0, 0])]
            found = pool.lookup(wanted)
            assert all(pool.block_hash[b] == h for b, h in zip(found, wanted))
            if pool.num_free - pool.num_idle(found) >= 0:
                pool.reuse(found)
                tables.append((found, wanted[:len(found)]))
        pool.check([t for t, _ in tables])
        assert pool.num_free == pool.ref_counts.count(0)
