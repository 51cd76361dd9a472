"""Pure-Python model of the C++ block manager (`gptfast._C.BlockManager`).

Same API, same semantics, same block ids: the differential tests run every operation on both
and compare everything, and the benchmark times it as the baseline. It favours being obviously
right over being fast: the free list is an OrderedDict (head = first key), the prefix cache a
dict from chained hash to block.

Semantics, in short (csrc/block_manager.h says the same at more length):

- block 0 is the null block, never handed out; the free list starts as 1..num_blocks-1;
  allocation pops the head; a freed sequence pushes its blocks to the tail, last block first.
- a full block i of a sequence has the chained hash H_i = block_hash(H_{i-1}, tokens of block
  i), H_{-1} = ROOT_HASH. Registration keeps the first block of a given hash while that entry is
  live (its parent link still valid); a dead entry gives way to the newcomer.
- a lookup hit needs the hash, equal token ids, and the parent link (block id and generation)
  equal to the block matched one level up; the generation of a block goes up each time the free
  list hands it out, which also evicts its cached hash.
- append_tokens runs in batch order; a token that would go into a shared last block makes the
  sequence copy it to a fresh block first (copy-on-write).
"""

from __future__ import annotations

from collections import OrderedDict

M64 = (1 << 64) - 1
ROOT_HASH = 0x6770746661737421  # "gptfast!"
GOLDEN = 0x9E3779B97F4A7C15
FOLD = 0xFF51AFD7ED558CCD
MIN_BLOCK_SIZE, MAX_BLOCK_SIZE = 1, 1024


def mix64(x: int) -> int:
    """splitmix64's finalizer on a 64-bit unsigned int (same as csrc/block_manager.h)."""
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & M64
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & M64
    x ^= x >> 31
    return x


def block_hash(parent: int, tokens) -> int:
    """Chained hash of one full block of token ids (same as csrc/block_manager.h)."""
    acc = parent
    for t in tokens:
        acc = ((acc ^ mix64((int(t) + GOLDEN) & M64)) * FOLD) & M64
    return mix64(acc)


class _Block:
    __slots__ = ("ref_cnt", "has_hash", "hash", "gen", "parent", "parent_gen", "tokens")

    def __init__(self):
        self.ref_cnt = 0
        self.has_hash = False
        self.hash = 0
        self.gen = 0
        self.parent = 0
        self.parent_gen = 0
        self.tokens: tuple = ()


class _Seq:
    __slots__ = ("tokens", "table", "hashes")

    def __init__(self, tokens, table, hashes):
        self.tokens = tokens
        self.table = table
        self.hashes = hashes


class BlockManagerModel:
    """Python twin of `gptfast._C.BlockManager` (see the module docstring)."""

    def __init__(self, num_blocks: int, block_size: int = 16, enable_prefix_caching: bool = True):
        if not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE:
            raise ValueError(
                f"block_size must be in [{MIN_BLOCK_SIZE}, {MAX_BLOCK_SIZE}], got {block_size}")
        max_blocks = (2**31 - 1) // block_size
        if not 2 <= num_blocks <= max_blocks:
            raise ValueError(f"num_blocks must be in [2, {max_blocks}], got {num_blocks}")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.total_blocks = num_blocks - 1
        self.enable_prefix_caching = enable_prefix_caching
        self.prefix_hit_tokens = 0
        self._blocks = [_Block() for _ in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(1, num_blocks))
        self._cached: dict[int, int] = {}
        self._seqs: dict[int, _Seq] = {}

    # -- queries ---------------------------------------------------------------------------

    def num_free_blocks(self) -> int:
        return len(self._free)

    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def num_sequences(self) -> int:
        return len(self._seqs)

    def has_sequence(self, seq_id: int) -> bool:
        return seq_id in self._seqs

    def _get(self, seq_id: int) -> _Seq:
        try:
            return self._seqs[seq_id]
        except KeyError:
            raise KeyError(f"unknown sequence id {seq_id} (never allocated, or already freed)")

    def num_tokens(self, seq_id: int) -> int:
        return len(self._get(seq_id).tokens)

    def blocks_of(self, seq_id: int) -> list[int]:
        return list(self._get(seq_id).table)

    def tokens_of(self, seq_id: int) -> list[int]:
        return list(self._get(seq_id).tokens)

    # -- free list and prefix cache ----------------------------------------------------------

    def _pop_free(self) -> int:
        b, _ = self._free.popitem(last=False)
        blk = self._blocks[b]
        if blk.has_hash:
            self._drop_hash(b)
        blk.gen += 1
        blk.ref_cnt = 1
        return b

    def _drop_hash(self, b: int) -> None:
        del self._cached[self._blocks[b].hash]
        self._blocks[b].has_hash = False

    def _live(self, b: int) -> bool:
        blk = self._blocks[b]
        if blk.parent == 0:
            return True
        parent = self._blocks[blk.parent]
        return parent.has_hash and parent.gen == blk.parent_gen

    def _register(self, b: int, h: int, parent: int, tokens: tuple) -> None:
        old = self._cached.get(h)
        if old is not None:
            if self._live(old):
                return
            self._drop_hash(old)
        blk = self._blocks[b]
        blk.has_hash, blk.hash, blk.parent, blk.tokens = True, h, parent, tokens
        blk.parent_gen = self._blocks[parent].gen
        self._cached[h] = b

    def _hash_full_blocks(self, s: _Seq) -> None:
        bs = self.block_size
        while len(s.hashes) < len(s.tokens) // bs:
            i = len(s.hashes)
            toks = tuple(s.tokens[i * bs:(i + 1) * bs])
            h = block_hash(s.hashes[-1] if i else ROOT_HASH, toks)
            s.hashes.append(h)
            b = s.table[i]
            if not self._blocks[b].has_hash:
                self._register(b, h, s.table[i - 1] if i else 0, toks)

    # -- operations --------------------------------------------------------------------------

    def allocate_prompt(self, seq_id: int, tokens) -> int:
        if seq_id in self._seqs:
            raise ValueError(f"sequence id {seq_id} already exists")
        toks = [int(t) for t in tokens]
        n, bs = len(toks), self.block_size
        if n == 0:
            raise ValueError(f"the prompt of sequence {seq_id} is empty; it needs at least one token")
        needed = -(-n // bs)
        if needed > self.total_blocks:
            raise ValueError(f"a prompt of {n} tokens needs {needed} blocks, the pool has only "
                             f"{self.total_blocks} (block_size {bs})")
        hits, hashes = [], []
        if self.enable_prefix_caching:
            h, prev = ROOT_HASH, 0
            for i in range((n - 1) // bs):
                block = tuple(toks[i * bs:(i + 1) * bs])
                h = block_hash(h, block)
                c = self._cached.get(h)
                if c is None:
                    break
                cand = self._blocks[c]
                if cand.parent != prev or cand.parent_gen != self._blocks[prev].gen:
                    break
                if cand.tokens != block:
                    break
                hits.append(c)
                hashes.append(h)
                prev = c
        take = needed - len(hits) + sum(self._blocks[c].ref_cnt == 0 for c in hits)
        if take > len(self._free):
            return -1
        table = []
        for c in hits:
            if self._blocks[c].ref_cnt == 0:
                del self._free[c]
            self._blocks[c].ref_cnt += 1
            table.append(c)
        while len(table) < needed:
            table.append(self._pop_free())
        s = _Seq(toks, table, hashes)
        if self.enable_prefix_caching:
            self._hash_full_blocks(s)
        self.prefix_hit_tokens += len(hits) * bs
        self._seqs[seq_id] = s
        return len(hits) * bs

    def slot_mapping(self, seq_id: int, start: int, end: int, out) -> None:
        s = self._get(seq_id)
        n = len(s.tokens)
        if not 0 <= start <= end <= n:
            raise ValueError(f"slot_mapping range [{start}, {end}) of sequence {seq_id} must "
                             f"satisfy 0 <= start <= end <= {n} (its number of tokens)")
        if len(out) < end - start:
            raise ValueError(f"slot_mapping output holds {len(out)} elements, the range needs "
                             f"{end - start}")
        bs = self.block_size
        for p in range(start, end):
            out[p - start] = s.table[p // bs] * bs + p % bs

    def _plan(self, seq_ids) -> tuple[list[_Seq], int]:
        seqs, seen, unref, needed = [], set(), {}, 0
        for i, sid in enumerate(seq_ids):
            sid = int(sid)
            s = self._get(sid)
            if sid in seen:
                raise ValueError(f"sequence id {sid} appears more than once in one append batch "
                                 f"(index {i})")
            seen.add(sid)
            seqs.append(s)
            if len(s.tokens) % self.block_size == 0:
                needed += 1
            else:
                b = s.table[-1]
                if self._blocks[b].ref_cnt - unref.get(b, 0) > 1:
                    needed += 1
                    unref[b] = unref.get(b, 0) + 1
        return seqs, needed

    def blocks_needed_for_append(self, seq_ids) -> int:
        return self._plan(seq_ids)[1]

    def append_tokens(self, seq_ids, tokens, slots_out, cow_out) -> int:
        if len(tokens) != len(seq_ids):
            raise ValueError(f"append_tokens got {len(seq_ids)} sequence ids but {len(tokens)} "
                             f"tokens; they must match")
        seqs, needed = self._plan(seq_ids)
        if needed > len(self._free):
            return -1
        bs, copies = self.block_size, 0
        for i, s in enumerate(seqs):
            pos = len(s.tokens)
            offset = pos % bs
            if offset == 0:
                s.table.append(self._pop_free())
            elif self._blocks[s.table[-1]].ref_cnt > 1:
                src, dst = s.table[-1], self._pop_free()
                self._blocks[src].ref_cnt -= 1
                s.table[-1] = dst
                cow_out[copies, 0] = src
                cow_out[copies, 1] = dst
                copies += 1
            s.tokens.append(int(tokens[i]))
            slots_out[i] = s.table[-1] * bs + offset
            if self.enable_prefix_caching and offset == bs - 1:
                self._hash_full_blocks(s)
        return copies

    def fork(self, parent_id: int, child_id: int) -> None:
        p = self._get(parent_id)
        if child_id in self._seqs:
            raise ValueError(f"cannot fork into sequence id {child_id}: it already exists")
        for b in p.table:
            self._blocks[b].ref_cnt += 1
        self._seqs[child_id] = _Seq(list(p.tokens), list(p.table), list(p.hashes))

    def free(self, seq_id: int) -> None:
        s = self._get(seq_id)
        for b in reversed(s.table):
            blk = self._blocks[b]
            blk.ref_cnt -= 1
            if blk.ref_cnt == 0:
                self._free[b] = None
        del self._seqs[seq_id]

    def block_tables(self, seq_ids, out) -> None:
        max_blocks = out.shape[1]
        for i, sid in enumerate(seq_ids):
            table = self._get(int(sid)).table
            if len(table) > max_blocks:
                raise ValueError(f"sequence {int(sid)} has {len(table)} blocks, the block table "
                                 f"buffer has {max_blocks} columns")
            out[i, :len(table)] = table
            out[i, len(table):] = 0

    def reset_prefix_cache(self) -> None:
        for b in self._cached.values():
            self._blocks[b].has_hash = False
        self._cached.clear()

    def check_invariants(self) -> None:
        owners = [0] * self.num_blocks
        for sid, s in self._seqs.items():
            if len(s.table) != -(-len(s.tokens) // self.block_size) or not s.tokens:
                raise RuntimeError(f"sequence {sid}: {len(s.tokens)} tokens, {len(s.table)} blocks")
            for b in s.table:
                if not 0 < b < self.num_blocks:
                    raise RuntimeError(f"sequence {sid} holds block id {b}")
                owners[b] += 1
        for b in range(1, self.num_blocks):
            if self._blocks[b].ref_cnt != owners[b]:
                raise RuntimeError(f"block {b} has ref_cnt {self._blocks[b].ref_cnt} but "
                                   f"{owners[b]} block tables hold it")
            if (b in self._free) != (owners[b] == 0):
                raise RuntimeError(f"block {b}: ref_cnt {owners[b]}, free {b in self._free}")
        if 0 in self._free or self._blocks[0].ref_cnt:
            raise RuntimeError("the null block 0 is free or in use")
        for h, b in self._cached.items():
            if not self._blocks[b].has_hash or self._blocks[b].hash != h:
                raise RuntimeError(f"hash map entry for block {b} does not match the block")
        if sum(blk.has_hash for blk in self._blocks) != len(self._cached):
            raise RuntimeError("blocks flagged cached do not match the hash map")

    def free_list(self) -> list[int]:
        """The free list from head (next to be handed out) to tail (tests)."""
        return list(self._free)
