// KV-cache block manager for gptfast: paged blocks, prefix caching, copy-on-write.
//
// Pure C++17 (no Python headers); bindings.cpp exposes it as gptfast._C.BlockManager.
//
// The pool holds `num_blocks` blocks of `block_size` token slots each. Block 0 is the null block:
// it is never handed out, never freed, and pads block tables. A sequence is its token ids plus an
// append-only block table; the token at position p lives in table[p / block_size] at offset
// p % block_size, in slot table[p / block_size] * block_size + p % block_size.
//
// Free blocks sit in an intrusive doubly linked list (O(1) removal from the middle). Allocation
// pops the head; a freed sequence pushes its blocks to the tail in reverse table order, so the
// tail blocks of a sequence (the least likely to be shared again) are reused first.
//
// Prefix caching: each full block of a sequence gets a chained hash
//   H_i = block_hash(H_{i-1}, tokens of block i),  H_{-1} = kRootHash.
// A registered block maps H_i -> block. A free block keeps its registration (its K/V is still
// valid) until the free list hands it out again (lazy LRU eviction). A lookup trusts no hash: a
// hit also needs equal token ids, and the candidate's parent link (the block before it in the
// table that registered it, at the generation it had then) must be the block matched one level
// up, so a 64-bit collision can never hand out wrong K/V.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

namespace gptfast {

// Thrown for a sequence id that the manager does not hold (Python sees KeyError).
class SequenceNotFound : public std::runtime_error {
 public:
  explicit SequenceNotFound(int64_t seq_id);
  int64_t seq_id() const { return seq_id_; }

 private:
  int64_t seq_id_;
};

// A read-only view of int32 or int64 values (token ids, sequence ids).
struct IntSpan {
  const void* data = nullptr;
  size_t size = 0;
  bool is64 = true;
  int64_t operator[](size_t i) const {
    return is64 ? static_cast<const int64_t*>(data)[i]
                : static_cast<const int32_t*>(data)[i];
  }
};

// A writable view of int32 or int64 values.
struct IntOut {
  void* data = nullptr;
  size_t size = 0;
  bool is64 = false;
  void set(size_t i, int64_t v) const {
    if (is64) {
      static_cast<int64_t*>(data)[i] = v;
    } else {
      static_cast<int32_t*>(data)[i] = static_cast<int32_t>(v);
    }
  }
};

constexpr int kMinBlockSize = 1;
constexpr int kMaxBlockSize = 1024;
constexpr uint64_t kRootHash = 0x6770746661737421ULL;  // "gptfast!"

// Strong 64-bit finalizer (splitmix64): every input bit affects every output bit.
inline uint64_t mix64(uint64_t x) {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebULL;
  x ^= x >> 31;
  return x;
}

// Chained hash of one full block: depends on the parent hash and on every token, in order.
// Each token is mixed on its own (independent work the CPU overlaps), then folded in order by
// an xor-multiply chain (a bijection per step: 4 cycles of latency instead of a full mix per
// token), and a final mix spreads every input bit over the result.
inline uint64_t block_hash(uint64_t parent, const int64_t* tokens, size_t n) {
  uint64_t acc = parent;
  for (size_t i = 0; i < n; ++i) {
    acc = (acc ^ mix64(static_cast<uint64_t>(tokens[i]) + 0x9e3779b97f4a7c15ULL)) *
          0xff51afd7ed558ccdULL;
  }
  return mix64(acc);
}

// Open-addressing map from a block hash to a block id: linear probing, backward-shift deletion
// (no tombstones), a fixed power-of-two capacity of at least twice the number of blocks (the
// map never holds more entries than blocks, so it never grows or rehashes). Keys are mix64
// outputs, so their low bits index the table directly. One cache line per lookup, no allocation
// on insert: registering a block on the decode path stays cheap.
class HashIndex {
 public:
  explicit HashIndex(size_t max_entries = 0);
  int32_t find(uint64_t key) const;             // block id, or -1
  void insert(uint64_t key, int32_t value);     // key must be absent
  void erase(uint64_t key);                     // key must be present
  size_t size() const { return size_; }
  void clear();
  template <typename F>
  void for_each(F&& f) const {
    for (const Slot& slot : slots_) {
      if (slot.value >= 0) f(slot.key, slot.value);
    }
  }

 private:
  struct Slot {
    uint64_t key = 0;
    int32_t value = -1;  // -1 = empty
  };
  std::vector<Slot> slots_;
  size_t mask_ = 0;
  size_t size_ = 0;
};

class BlockManager {
 public:
  BlockManager(int64_t num_blocks, int64_t block_size, bool enable_prefix_caching);

  int block_size() const { return block_size_; }
  int64_t num_blocks() const { return static_cast<int64_t>(blocks_.size()); }
  int64_t total_blocks() const { return num_blocks() - 1; }
  int64_t num_free_blocks() const { return num_free_; }
  int64_t num_cached_blocks() const { return static_cast<int64_t>(cached_.size()); }
  int64_t prefix_hit_tokens() const { return prefix_hit_tokens_; }
  bool enable_prefix_caching() const { return caching_; }
  int64_t num_sequences() const { return static_cast<int64_t>(seqs_.size()); }
  bool has_sequence(int64_t seq_id) const { return seqs_.count(seq_id) != 0; }
  int64_t num_tokens(int64_t seq_id) const;
  std::vector<int32_t> blocks_of(int64_t seq_id) const;
  std::vector<int64_t> tokens_of(int64_t seq_id) const;
  // The free list from head (handed out next) to tail.
  std::vector<int32_t> free_list() const;
  // Writes the blocks the next allocations will take, in order (the head of the free list),
  // into out[0 : n]; returns n = min(out.size, free blocks). Lets a caller that must name a
  // block before it can append the token (a decode step launched ahead) know which one it gets.
  int64_t next_free_blocks(IntOut out) const;

  // Registers a new sequence with prompt `tokens`; returns how many leading tokens are already
  // cached (a multiple of block_size, always < tokens.size()), or -1 (nothing changed) when the
  // free blocks do not suffice.
  int64_t allocate_prompt(int64_t seq_id, IntSpan tokens);

  // Writes the slot ids of positions [start, end) of a sequence into out[0 : end - start].
  void slot_mapping(int64_t seq_id, int64_t start, int64_t end, IntOut out) const;

  // Free blocks that append_tokens(seq_ids, ...) would take (new blocks + copy-on-write copies).
  int64_t blocks_needed_for_append(IntSpan seq_ids);

  // One decode step: appends tokens[i] to seq_ids[i], writes its slot into slots_out[i] and each
  // copy-on-write pair into cow_out[2k], cow_out[2k + 1]. Returns the number of copies, or -1
  // (nothing changed) when the free blocks do not suffice.
  int64_t append_tokens(IntSpan seq_ids, IntSpan tokens, IntOut slots_out, IntOut cow_out);

  // The child shares every block of the parent (and its tokens).
  void fork(int64_t parent_id, int64_t child_id);

  // Releases the sequence's blocks, last block first.
  void free(int64_t seq_id);

  // Writes each sequence's block table as a row of `out` (row-major, `row_stride` int32 per row,
  // `max_blocks` columns), padding with 0.
  void block_tables(IntSpan seq_ids, int32_t* out, int64_t max_blocks, int64_t row_stride);

  // Drops every cached hash (used and free blocks alike).
  void reset_prefix_cache();

  // Throws std::runtime_error describing the first violated invariant.
  void check_invariants() const;

 private:
  struct Block {
    int32_t ref_cnt = 0;
    int32_t prev = -1;  // free-list links; -1 = none
    int32_t next = -1;
    bool in_free_list = false;
    bool has_hash = false;
    uint64_t hash = 0;
    // Bumped each time the block is handed out from the free list: a (block, gen) pair names
    // one content of the block.
    uint64_t gen = 0;
    // Parent link recorded at registration: the block before this one in the registering table
    // (0 for a first block) and its generation then.
    int32_t parent = 0;
    uint64_t parent_gen = 0;
  };

  struct Sequence {
    std::vector<int64_t> tokens;
    std::vector<int32_t> table;
    std::vector<uint64_t> hashes;  // chained hashes of the full blocks hashed so far
    uint64_t stamp = 0;            // last append batch that touched it (duplicate detection)
  };

  void reserve_for_decode(Sequence& s, size_t n) const;
  Sequence& get(int64_t seq_id);
  const Sequence& get(int64_t seq_id) const;

  // Free list.
  void push_free_tail(int32_t b);
  void remove_free(int32_t b);
  int32_t pop_free_head();  // also evicts the block's cached hash

  // Prefix cache.
  bool entry_is_live(int32_t b) const;
  void drop_hash(int32_t b);
  void register_block(int32_t b, uint64_t hash, int32_t parent, const int64_t* tokens);
  void hash_full_blocks(Sequence& s);  // extends s.hashes to every full block, registering each

  // Shared by blocks_needed_for_append / append_tokens: fills scratch_ with the sequences and
  // returns the blocks the append needs. Throws on unknown or duplicate ids.
  int64_t plan_append(IntSpan seq_ids);

  int block_size_;
  bool caching_;
  std::vector<Block> blocks_;
  std::vector<int64_t> cached_tokens_;  // [num_blocks, block_size] token ids of registered blocks
  int32_t free_head_ = -1;
  int32_t free_tail_ = -1;
  int64_t num_free_ = 0;
  int64_t prefix_hit_tokens_ = 0;
  HashIndex cached_;  // chained hash -> block
  std::unordered_map<int64_t, Sequence> seqs_;
  uint64_t batch_stamp_ = 0;
  std::vector<Sequence*> scratch_;       // sequences of the batch being planned
  std::vector<int32_t> pending_unref_;   // [num_blocks] copy-on-write unrefs while planning
};

}  // namespace gptfast
