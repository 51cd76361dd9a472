"""The C++ block manager (gptfast._C.BlockManager) against its Python model, plus focused cases.

The differential tests run random operations on both (prompts from a 3-token alphabet so
prefix hits, shared blocks and evictions happen often) and compare every return value, error
type, block table, slot mapping, free list, statistic and invariant after each step.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from block_manager_model import ROOT_HASH, BlockManagerModel, block_hash

_C = pytest.importorskip("gptfast._C", reason="the C++ extension is not built (pip install -e .)")
BlockManager = _C.BlockManager


# ---------------------------------------------------------------------------------------------
# Helpers


def _both(num_blocks, block_size, caching=True):
    return BlockManager(num_blocks, block_size, caching), BlockManagerModel(num_blocks, block_size,
                                                                            caching)


def _call(obj, name, *args):
    """(result, None) or (None, exception type) of obj.name(*args)."""
    try:
        return getattr(obj, name)(*args), None
    except (ValueError, KeyError, TypeError) as e:
        return None, type(e)


def _append(mgr, ids, toks, dtype=np.int64):
    slots = np.full(len(ids), -7, dtype)
    cow = np.full((len(ids), 2), -7, dtype)
    k = mgr.append_tokens(np.asarray(ids, np.int64), np.asarray(toks, np.int64), slots, cow)
    return k, slots, cow


def _assert_same_state(cpp, model):
    cpp.check_invariants()
    model.check_invariants()
    assert cpp.num_free_blocks() == model.num_free_blocks()
    assert cpp.num_cached_blocks() == model.num_cached_blocks()
    assert cpp.prefix_hit_tokens == model.prefix_hit_tokens
    assert cpp.num_sequences() == model.num_sequences()
    assert cpp.free_list() == model.free_list()
    head = np.full(3, -7, np.int32)
    n = cpp.next_free_blocks(head)
    assert head[:n].tolist() == model.free_list()[:3] and n == min(3, model.num_free_blocks())
    for sid in list(model._seqs):
        assert cpp.has_sequence(sid)
        assert cpp.blocks_of(sid) == model.blocks_of(sid), f"block table of sequence {sid}"
        assert cpp.tokens_of(sid) == model.tokens_of(sid), f"tokens of sequence {sid}"
        assert cpp.num_tokens(sid) == model.num_tokens(sid)


class _Driver:
    """Applies one random operation to both managers and compares the outcome."""

    def __init__(self, rng: random.Random, num_blocks: int, block_size: int, caching: bool):
        self.rng = rng
        self.cpp, self.model = _both(num_blocks, block_size, caching)
        self.next_id = 0

    def live(self):
        return list(self.model._seqs)

    def prompt(self):
        bs = self.model.block_size
        return [self.rng.randrange(3) for _ in range(self.rng.randint(1, 5 * bs))]

    def step(self):
        rng, cpp, model = self.rng, self.cpp, self.model
        live = self.live()
        op = rng.randrange(12)
        if op <= 2:
            toks = self.prompt()
            # The C++ side gets every accepted container: int32/int64 numpy, torch, list.
            kind = rng.randrange(4)
            arg = (np.asarray(toks, np.int32), np.asarray(toks, np.int64),
                   torch.tensor(toks, dtype=torch.int64), toks)[kind]
            sid = self.next_id if rng.random() < 0.95 or not live else rng.choice(live)
            got, want = _call(cpp, "allocate_prompt", sid, arg), _call(model, "allocate_prompt", sid,
                                                                        toks)
            assert got == want, f"allocate_prompt({sid}, {toks})"
            self.next_id += 1
        elif op <= 6 and live:
            ids = rng.sample(live, rng.randint(1, min(len(live), 6)))
            if rng.random() < 0.05:
                ids.append(ids[0])  # duplicate id: ValueError from both
            if rng.random() < 0.03:
                ids.append(10**9)  # unknown id: KeyError from both
            toks = [rng.randrange(3) for _ in ids]
            assert _call(cpp, "blocks_needed_for_append", ids) == \
                _call(model, "blocks_needed_for_append", ids)
            dtype = rng.choice([np.int32, np.int64])
            s1, c1 = np.full(len(ids), -7, dtype), np.full((len(ids), 2), -7, dtype)
            s2, c2 = np.full(len(ids), -7, np.int64), np.full((len(ids), 2), -7, np.int64)
            got = _call(cpp, "append_tokens", np.asarray(ids, np.int64),
                        np.asarray(toks, np.int32), s1, c1)
            want = _call(model, "append_tokens", ids, toks, s2, c2)
            assert got == want, f"append_tokens({ids})"
            if got[0] is not None and got[0] >= 0:
                assert s1.tolist() == s2.tolist()
                assert c1[:got[0]].tolist() == c2[:got[0]].tolist()
        elif op == 7 and live:
            parent = rng.choice(live)
            child = self.next_id if rng.random() < 0.95 else parent
            assert _call(cpp, "fork", parent, child) == _call(model, "fork", parent, child)
            self.next_id += 1
        elif op <= 9:
            sid = rng.choice(live) if live and rng.random() < 0.9 else self.next_id + 5
            assert _call(cpp, "free", sid) == _call(model, "free", sid)
        elif op == 10 and live:
            sid = rng.choice(live)
            n = model.num_tokens(sid)
            start = rng.randint(0, n)
            end = rng.randint(start, n + (1 if rng.random() < 0.1 else 0))
            a = np.full(max(end - start, 1), -7, rng.choice([np.int32, np.int64]))
            b = np.full(max(end - start, 1), -7, np.int64)
            assert _call(cpp, "slot_mapping", sid, start, end, a) == \
                _call(model, "slot_mapping", sid, start, end, b)
            assert a.tolist() == b.tolist()
        elif op == 11:
            if rng.random() < 0.1:
                cpp.reset_prefix_cache()
                model.reset_prefix_cache()
            elif live:
                ids = rng.sample(live, rng.randint(1, len(live)))
                width = rng.randint(1, 8)
                a = np.full((len(ids) + 1, width), -7, np.int32)
                b = np.full((len(ids) + 1, width), -7, np.int32)
                got, want = _call(cpp, "block_tables", ids, a), _call(model, "block_tables", ids, b)
                assert got == want, f"block_tables({ids}) into width {width}"
                if want[1] is None:
                    assert a.tolist() == b.tolist()
        _assert_same_state(cpp, model)

    def drain(self):
        for sid in self.live():
            self.cpp.free(sid)
            self.model.free(sid)
        _assert_same_state(self.cpp, self.model)
        assert self.cpp.num_free_blocks() == self.cpp.total_blocks


# ---------------------------------------------------------------------------------------------
# Differential tests


@pytest.mark.parametrize("seed", range(24))
def test_random_ops_match_model(seed):
    rng = random.Random(seed)
    block_size = rng.choice([1, 2, 3, 4, 16])
    # Mostly roomy pools (hits, copy-on-write), some tight ones (-1 results, evictions).
    num_blocks = rng.randint(2, 12) if seed % 4 == 0 else rng.randint(24, 96)
    drv = _Driver(rng, num_blocks, block_size, caching=seed % 8 != 7)
    for _ in range(1500):
        drv.step()
    drv.drain()


def test_append_outputs_match_model():
    """Slots and copy-on-write pairs written by append_tokens, compared element by element."""
    rng = random.Random(1234)
    for trial in range(30):
        bs = rng.choice([1, 2, 4, 16])
        cpp, model = _both(rng.randint(8, 40), bs)
        ids = []
        for sid in range(rng.randint(1, 4)):
            toks = [rng.randrange(3) for _ in range(rng.randint(1, 3 * bs))]
            if cpp.allocate_prompt(sid, toks) >= 0:
                model.allocate_prompt(sid, toks)
                ids.append(sid)
        for sid in list(ids):
            if rng.random() < 0.6:
                cpp.fork(sid, 100 + sid)
                model.fork(sid, 100 + sid)
                ids.append(100 + sid)
        for _ in range(3 * bs):
            batch = rng.sample(ids, len(ids))
            toks = [rng.randrange(3) for _ in batch]
            dtype = rng.choice([np.int32, np.int64])
            k1, s1, c1 = _append(cpp, batch, toks, dtype)
            k2, s2, c2 = _append(model, batch, toks)
            assert k1 == k2, f"trial {trial}"
            if k1 < 0:
                assert (s1 == -7).all() and (c1 == -7).all()
                break
            assert s1.tolist() == s2.tolist()
            assert c1[:k1].tolist() == c2[:k2].tolist()
            assert (c1[k1:] == -7).all()
            _assert_same_state(cpp, model)


class ManagerMachine(RuleBasedStateMachine):
    """Hypothesis stateful test: shrinks a failing operation sequence to a minimal one."""

    def __init__(self):
        super().__init__()
        self.cpp, self.model = _both(24, 2)
        self.next_id = 0

    @rule(toks=st.lists(st.integers(0, 2), min_size=1, max_size=12))
    def allocate(self, toks):
        assert self.cpp.allocate_prompt(self.next_id, np.asarray(toks, np.int32)) == \
            self.model.allocate_prompt(self.next_id, toks)
        self.next_id += 1

    @precondition(lambda self: self.model.num_sequences() > 0)
    @rule(data=st.data())
    def append(self, data):
        live = list(self.model._seqs)
        ids = data.draw(st.lists(st.sampled_from(live), min_size=1, unique=True))
        toks = data.draw(st.lists(st.integers(0, 2), min_size=len(ids), max_size=len(ids)))
        k1, s1, c1 = _append(self.cpp, ids, toks)
        k2, s2, c2 = _append(self.model, ids, toks)
        assert k1 == k2
        if k1 >= 0:
            assert s1.tolist() == s2.tolist() and c1[:k1].tolist() == c2[:k2].tolist()

    @precondition(lambda self: self.model.num_sequences() > 0)
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(list(self.model._seqs)))
        self.cpp.fork(parent, self.next_id)
        self.model.fork(parent, self.next_id)
        self.next_id += 1

    @precondition(lambda self: self.model.num_sequences() > 0)
    @rule(data=st.data())
    def free(self, data):
        sid = data.draw(st.sampled_from(list(self.model._seqs)))
        self.cpp.free(sid)
        self.model.free(sid)

    @invariant()
    def same_state(self):
        _assert_same_state(self.cpp, self.model)


ManagerMachine.TestCase.settings = settings(
    max_examples=100, stateful_step_count=50, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
test_manager_machine = ManagerMachine.TestCase


# ---------------------------------------------------------------------------------------------
# Focused cases


def test_next_free_blocks_names_the_blocks_the_next_appends_take():
    # A decode step launched ahead names its new block before the token is known: the blocks
    # next_free_blocks reports must be the ones append_tokens then takes, in batch order.
    bm = BlockManager(12, 4, True)
    bm.allocate_prompt(0, np.arange(4))
    bm.allocate_prompt(1, np.arange(10, 14))
    bm.allocate_prompt(2, np.arange(20, 29))
    bm.free(2)  # its blocks go to the tail, two of them still cached
    ahead = np.full(5, -1, np.int64)
    assert bm.next_free_blocks(ahead[:2]) == 2
    k, slots, _ = _append(bm, [0, 1], [7, 8])  # both at a block boundary: two new blocks
    assert k == 0 and (slots // 4).tolist() == ahead[:2].tolist() and (slots % 4).tolist() == [0, 0]
    assert bm.next_free_blocks(ahead) == 5 and ahead.tolist() == bm.free_list()[:5]
    assert bm.next_free_blocks(np.empty(0, np.int32)) == 0
    with pytest.raises(ValueError):
        bm.next_free_blocks(np.empty((2, 2), np.int32))


def test_construction_and_properties():
    bm = BlockManager(10)
    assert (bm.block_size, bm.num_blocks, bm.total_blocks) == (16, 10, 9)
    assert bm.num_free_blocks() == 9 and bm.num_cached_blocks() == 0 and bm.prefix_hit_tokens == 0
    assert bm.free_list() == list(range(1, 10))
    for bad in (0, -1, 1025):
        with pytest.raises(ValueError, match=rf"block_size must be in \[1, 1024\], got {bad}"):
            BlockManager(10, bad)
    with pytest.raises(ValueError, match="num_blocks must be in"):
        BlockManager(1, 16)
    with pytest.raises(ValueError, match="num_blocks must be in"):
        BlockManager(2**31 // 16 + 1, 16)  # slot ids would overflow int32


def test_allocate_prompt_errors():
    bm = BlockManager(5, 4)  # 4 usable blocks: 16 tokens at most
    assert bm.allocate_prompt(0, [1, 2, 3]) == 0
    with pytest.raises(ValueError, match="sequence id 0 already exists"):
        bm.allocate_prompt(0, [1])
    with pytest.raises(ValueError, match="empty"):
        bm.allocate_prompt(1, np.zeros(0, np.int64))
    with pytest.raises(ValueError, match="needs 5 blocks, the pool has only 4"):
        bm.allocate_prompt(1, np.arange(17))
    with pytest.raises(TypeError, match="float32"):
        bm.allocate_prompt(1, np.zeros(3, np.float32))
    with pytest.raises(TypeError, match="uint8"):
        bm.allocate_prompt(1, np.zeros(3, np.uint8))
    with pytest.raises(ValueError, match="1-D, got 2-D"):
        bm.allocate_prompt(1, np.zeros((2, 2), np.int64))
    with pytest.raises(ValueError, match="C-contiguous"):
        bm.allocate_prompt(1, np.arange(8)[::2])
    with pytest.raises(TypeError, match="must hold ints, got an element of type float"):
        bm.allocate_prompt(1, [1, 2.5])
    with pytest.raises(ValueError, match="outside the int64 range"):
        bm.allocate_prompt(1, [1, 2**70])
    with pytest.raises(TypeError, match="non-native byte order"):
        bm.allocate_prompt(1, np.zeros(3, np.dtype(np.int64).newbyteorder()))
    with pytest.raises(TypeError, match="got str"):
        bm.allocate_prompt(1, "abc")
    assert not bm.has_sequence(1)
    bm.check_invariants()


def test_all_or_nothing_allocation_changes_nothing():
    cpp, model = _both(6, 2)  # 5 usable blocks
    for m in (cpp, model):
        assert m.allocate_prompt(0, [0, 1, 2, 3, 4]) == 0  # 3 blocks, two full ones cached
        m.free(0)  # free list: 4 5 3 2 1, blocks 1, 2 cached
        assert m.allocate_prompt(1, [9, 9, 9]) == 0  # takes 4, 5
    assert cpp.free_list() == [3, 2, 1]
    # Needs 4 blocks: 2 hits (both free, so they count) + 2 new; only 3 free.
    before = (cpp.free_list(), cpp.num_cached_blocks(), cpp.prefix_hit_tokens)
    assert cpp.allocate_prompt(2, [0, 1, 2, 3, 5, 6, 7]) == -1
    assert model.allocate_prompt(2, [0, 1, 2, 3, 5, 6, 7]) == -1
    assert (cpp.free_list(), cpp.num_cached_blocks(), cpp.prefix_hit_tokens) == before
    assert not cpp.has_sequence(2)
    _assert_same_state(cpp, model)


def test_prefix_hit_never_covers_the_whole_prompt():
    bm = BlockManager(20, 4)
    assert bm.allocate_prompt(0, np.arange(8)) == 0
    assert bm.num_cached_blocks() == 2
    assert bm.allocate_prompt(1, np.arange(8)) == 4  # last block recomputed for its logits
    assert bm.allocate_prompt(2, np.arange(9)) == 8
    assert bm.allocate_prompt(3, np.arange(3)) == 0  # no full block
    assert bm.blocks_of(1)[0] == bm.blocks_of(0)[0] == bm.blocks_of(2)[0]
    assert bm.prefix_hit_tokens == 12
    bm.check_invariants()


def test_prefix_caching_disabled():
    bm = BlockManager(20, 4, enable_prefix_caching=False)
    assert bm.allocate_prompt(0, np.arange(12)) == 0
    assert bm.allocate_prompt(1, np.arange(12)) == 0
    assert bm.num_cached_blocks() == 0 and bm.prefix_hit_tokens == 0
    assert set(bm.blocks_of(0)).isdisjoint(bm.blocks_of(1))


def test_reverse_order_free_and_lru_eviction():
    bm = BlockManager(9, 2)
    bm.allocate_prompt(1, [10, 11, 12, 13, 14, 15])  # blocks 1 2 3
    bm.allocate_prompt(2, [20, 21, 22])  # blocks 4 5
    bm.free(1)
    assert bm.free_list() == [6, 7, 8, 3, 2, 1]  # the sequence's last block first
    bm.free(2)
    assert bm.free_list() == [6, 7, 8, 3, 2, 1, 5, 4]
    assert bm.num_cached_blocks() == 4  # freed blocks keep their hashes (1, 2, 3, 4)
    # Four new blocks: the uncached 6 7 8, then the least recently freed cached block 3.
    assert bm.allocate_prompt(3, [30, 31, 32, 33, 34, 35, 36, 37]) == 0
    assert bm.blocks_of(3) == [6, 7, 8, 3]
    assert bm.num_cached_blocks() == 3 + 4  # 3 evicted, then 6 7 8 3 (all full) registered
    # 1 and 2 are still cached: a hit takes them off the middle of the free list.
    assert bm.allocate_prompt(4, [10, 11, 12, 13, 14, 15]) == 4
    assert bm.blocks_of(4) == [1, 2, 5]
    assert bm.free_list() == [4]
    bm.check_invariants()


def test_evicting_a_child_block_keeps_its_parent_cached():
    bm = BlockManager(4, 2)  # 3 usable blocks
    bm.allocate_prompt(0, [1, 1, 2, 2, 3])  # blocks 1 (parent), 2 (child), 3
    bm.free(0)  # free list: 3 2 1
    bm.allocate_prompt(1, [7, 7, 7])  # takes 3 and 2: block 2 (child) evicted
    bm.free(1)  # free list: 1 2 3
    # Block 1 (hash of [1, 1]) survived: a prompt starting [1, 1] hits it.
    assert bm.allocate_prompt(2, [1, 1, 2, 2, 9]) == 2
    bm.check_invariants()


def test_hash_collision_cannot_hand_out_wrong_blocks():
    """Forge a collision: the manager must compare token ids, not trust the hash."""
    model = BlockManagerModel(10, 2)
    model.allocate_prompt(0, [5, 6, 7])
    # Point the hash of [8, 9] at block 1, which holds [5, 6].
    h = block_hash(ROOT_HASH, (8, 9))
    model._cached[h] = model._cached.pop(block_hash(ROOT_HASH, (5, 6)))
    model._blocks[1].hash = h
    assert model.allocate_prompt(1, [8, 9, 1]) == 0  # no hit despite the equal hash
    assert 1 not in model.blocks_of(1)


def test_model_hash_equals_cpp_hash():
    assert _C.ROOT_HASH == ROOT_HASH
    rng = random.Random(5)
    for n in (1, 2, 16, 33):
        toks = [rng.randrange(-2**63, 2**63) for _ in range(n)]
        parent = rng.randrange(2**64)
        assert _C.block_hash(parent, toks) == block_hash(parent, toks)
    # Order matters, and so does the parent.
    assert block_hash(ROOT_HASH, [1, 2]) != block_hash(ROOT_HASH, [2, 1])
    assert block_hash(ROOT_HASH, [1, 2]) != block_hash(ROOT_HASH + 1, [1, 2])


def test_slot_mapping_and_errors():
    bm = BlockManager(10, 4)
    bm.allocate_prompt(0, np.arange(10))  # blocks 1 2 3
    out = np.full(10, -1, np.int64)
    bm.slot_mapping(0, 0, 10, out)
    assert out.tolist() == [4, 5, 6, 7, 8, 9, 10, 11, 12, 13]
    out32 = torch.full((4,), -1, dtype=torch.int32)
    bm.slot_mapping(0, 6, 10, out32)
    assert out32.tolist() == [10, 11, 12, 13]
    bm.slot_mapping(0, 5, 5, np.zeros(0, np.int32))  # empty range
    with pytest.raises(ValueError, match=r"range \[0, 11\)"):
        bm.slot_mapping(0, 0, 11, np.zeros(11, np.int32))
    with pytest.raises(ValueError, match=r"range \[3, 2\)"):
        bm.slot_mapping(0, 3, 2, np.zeros(11, np.int32))
    with pytest.raises(ValueError, match="holds 3 elements, the range needs 4"):
        bm.slot_mapping(0, 0, 4, np.zeros(3, np.int32))
    with pytest.raises(KeyError, match="unknown sequence id 9"):
        bm.slot_mapping(9, 0, 1, np.zeros(1, np.int32))
    with pytest.raises(TypeError, match="float64"):
        bm.slot_mapping(0, 0, 4, np.zeros(4))
    with pytest.raises(ValueError, match="out: .*read-only"):
        ro = np.zeros(4, np.int32)
        ro.flags.writeable = False
        bm.slot_mapping(0, 0, 4, ro)


def test_copy_on_write_after_fork():
    bm = BlockManager(10, 4)
    bm.allocate_prompt(0, np.arange(6))  # blocks 1 (full), 2 (2 tokens)
    bm.fork(0, 1)
    assert bm.blocks_of(1) == [1, 2] and bm.tokens_of(1) == list(range(6))
    assert bm.blocks_needed_for_append([0, 1]) == 1
    k, slots, cow = _append(bm, [1, 0], [40, 50], np.int32)
    assert k == 1
    assert cow[0].tolist() == [2, 3]  # sequence 1 copies block 2 into block 3
    assert slots.tolist() == [3 * 4 + 2, 2 * 4 + 2]  # sequence 0 then owns block 2 alone
    assert bm.blocks_of(1) == [1, 3] and bm.blocks_of(0) == [1, 2]
    # Shared partial block again (3 tokens in block 2): copied into block 4.
    bm.fork(0, 2)
    k, slots, cow = _append(bm, [0], [7])
    assert k == 1 and cow[0].tolist() == [2, 4] and slots.tolist() == [4 * 4 + 3]
    # Shared full block: the token goes into a new block, nothing to copy.
    bm.fork(0, 3)
    k, slots, cow = _append(bm, [0], [8])
    assert k == 0 and slots.tolist() == [5 * 4] and bm.blocks_of(3) == [1, 4]
    bm.check_invariants()
    with pytest.raises(KeyError):
        bm.fork(99, 100)
    with pytest.raises(ValueError, match="already exists"):
        bm.fork(0, 1)


def test_append_registers_full_blocks_for_reuse():
    bm = BlockManager(20, 4)
    bm.allocate_prompt(0, [1, 2, 3])
    k, slots, _ = _append(bm, [0], [4])
    assert k == 0 and slots.tolist() == [7]
    assert bm.num_cached_blocks() == 1  # the block filled by the append is cached
    assert bm.allocate_prompt(1, [1, 2, 3, 4, 5]) == 4


def test_append_errors_and_all_or_nothing():
    bm = BlockManager(4, 2)  # 3 usable blocks
    bm.allocate_prompt(0, [1, 2, 3, 4])  # 2 blocks, full
    bm.allocate_prompt(1, [5])  # 1 block, 1 slot left
    before = (bm.blocks_of(0), bm.blocks_of(1), bm.num_tokens(0), bm.num_tokens(1))
    slots = np.full(2, -7, np.int32)
    cow = np.full((2, 2), -7, np.int32)
    assert bm.blocks_needed_for_append([1, 0]) == 1
    assert bm.append_tokens(np.array([1, 0]), np.array([6, 7]), slots, cow) == -1
    assert (bm.blocks_of(0), bm.blocks_of(1), bm.num_tokens(0), bm.num_tokens(1)) == before
    assert (slots == -7).all()
    with pytest.raises(ValueError, match="sequence id 1 appears more than once"):
        bm.append_tokens(np.array([1, 1]), np.array([6, 7]), slots, cow)
    with pytest.raises(KeyError, match="unknown sequence id 8"):
        bm.append_tokens(np.array([1, 8]), np.array([6, 7]), slots, cow)
    with pytest.raises(ValueError, match="2 sequence ids but 1 tokens"):
        bm.append_tokens(np.array([1, 0]), np.array([6]), slots, cow)
    with pytest.raises(ValueError, match="slots_out holds 1 elements"):
        bm.append_tokens(np.array([1, 0]), np.array([6, 7]), slots[:1], cow)
    with pytest.raises(ValueError, match=r"cow_out must have shape \[B, 2\]"):
        bm.append_tokens(np.array([1]), np.array([6]), slots, np.zeros((2, 3), np.int32))
    with pytest.raises(ValueError, match="cow_out holds 1 rows"):
        bm.append_tokens(np.array([1, 0]), np.array([6, 7]), slots, cow[:1])
    with pytest.raises(ValueError, match="2-D, got 1-D"):
        bm.append_tokens(np.array([1]), np.array([6]), slots, np.zeros(2, np.int32))
    with pytest.raises(TypeError, match="slots_out must be a 1-D integer buffer .* got NoneType"):
        bm.append_tokens(np.array([1]), np.array([6]), None, cow)
    # A failed call (error or -1) leaves the manager usable and unchanged.
    assert (bm.blocks_of(0), bm.blocks_of(1), bm.num_tokens(0), bm.num_tokens(1)) == before
    assert bm.append_tokens(np.array([1]), np.array([6]), slots, cow) == 0
    bm.check_invariants()


def test_free_errors():
    bm = BlockManager(10, 4)
    bm.allocate_prompt(3, [1, 2])
    bm.free(3)
    with pytest.raises(KeyError, match="unknown sequence id 3"):
        bm.free(3)  # double free
    with pytest.raises(KeyError, match="unknown sequence id 4"):
        bm.free(4)
    assert bm.num_free_blocks() == bm.total_blocks
    bm.check_invariants()


def test_block_tables():
    bm = BlockManager(20, 4)
    bm.allocate_prompt(0, np.arange(9))  # 3 blocks
    bm.allocate_prompt(1, [1])  # 1 block
    out = np.full((3, 5), -1, np.int32)
    bm.block_tables(np.array([1, 0]), out)
    assert out[0].tolist() == bm.blocks_of(1) + [0] * 4
    assert out[1].tolist() == bm.blocks_of(0) + [0] * 2
    assert out[2].tolist() == [-1] * 5  # rows past the batch are left alone
    t = torch.full((2, 3), -1, dtype=torch.int32)
    bm.block_tables([0, 1], t)
    assert t[0].tolist() == bm.blocks_of(0)
    with pytest.raises(ValueError, match="sequence 0 has 3 blocks, the block table buffer has 2"):
        bm.block_tables([0], np.zeros((1, 2), np.int32))
    with pytest.raises(ValueError, match="out has 1 rows, the batch has 2"):
        bm.block_tables([0, 1], np.zeros((1, 5), np.int32))
    with pytest.raises(TypeError, match="int32, got int64"):
        bm.block_tables([0], np.zeros((1, 5), np.int64))
    with pytest.raises(ValueError, match="C-contiguous"):
        bm.block_tables([0], np.zeros((5, 2), np.int32).T)
    with pytest.raises(KeyError):
        bm.block_tables([7], np.zeros((1, 5), np.int32))


def test_reset_prefix_cache():
    bm = BlockManager(20, 4)
    bm.allocate_prompt(0, np.arange(9))
    assert bm.num_cached_blocks() == 2
    bm.reset_prefix_cache()
    assert bm.num_cached_blocks() == 0
    assert bm.allocate_prompt(1, np.arange(9)) == 0
    bm.check_invariants()


@pytest.mark.gpu
def test_cuda_tensor_is_refused_cleanly():
    bm = BlockManager(10, 4)
    with pytest.raises(TypeError):
        bm.allocate_prompt(0, torch.arange(4, device="cuda"))
