#include "block_manager.h"

#include <algorithm>
#include <cstring>

namespace gptfast {

namespace {

std::string seq_message(int64_t seq_id) {
  return "unknown sequence id " + std::to_string(seq_id) +
         " (never allocated, or already freed)";
}

[[noreturn]] void invariant_failed(const std::string& what) {
  throw std::runtime_error("block manager invariant violated: " + what);
}

}  // namespace

HashIndex::HashIndex(size_t max_entries) {
  size_t capacity = 16;
  while (capacity < 2 * max_entries) capacity *= 2;
  slots_.assign(capacity, Slot{});
  mask_ = capacity - 1;
}

int32_t HashIndex::find(uint64_t key) const {
  for (size_t i = key & mask_;; i = (i + 1) & mask_) {
    const Slot& slot = slots_[i];
    if (slot.value < 0) return -1;
    if (slot.key == key) return slot.value;
  }
}

void HashIndex::insert(uint64_t key, int32_t value) {
  size_t i = key & mask_;
  while (slots_[i].value >= 0) i = (i + 1) & mask_;
  slots_[i] = Slot{key, value};
  ++size_;
}

void HashIndex::erase(uint64_t key) {
  size_t hole = key & mask_;
  for (;; hole = (hole + 1) & mask_) {
    if (slots_[hole].value < 0) return;  // absent
    if (slots_[hole].key == key) break;
  }
  // Backward shift: pull later entries of the probe run into the hole when their home slot
  // does not lie (cyclically) between the hole and their current slot.
  for (size_t j = (hole + 1) & mask_; slots_[j].value >= 0; j = (j + 1) & mask_) {
    const size_t home = slots_[j].key & mask_;
    const size_t dist_home = (j - home) & mask_;
    const size_t dist_hole = (j - hole) & mask_;
    if (dist_home >= dist_hole) {
      slots_[hole] = slots_[j];
      hole = j;
    }
  }
  slots_[hole] = Slot{};
  --size_;
}

void HashIndex::clear() {
  for (Slot& slot : slots_) slot = Slot{};
  size_ = 0;
}

SequenceNotFound::SequenceNotFound(int64_t seq_id)
    : std::runtime_error(seq_message(seq_id)), seq_id_(seq_id) {}

BlockManager::BlockManager(int64_t num_blocks, int64_t block_size, bool enable_prefix_caching)
    : block_size_(0), caching_(enable_prefix_caching) {
  if (block_size < kMinBlockSize || block_size > kMaxBlockSize) {
    throw std::invalid_argument("block_size must be in [" + std::to_string(kMinBlockSize) +
                                ", " + std::to_string(kMaxBlockSize) + "], got " +
                                std::to_string(block_size));
  }
  // Block ids are int32 in block tables, and slot ids (block * block_size + offset) must fit
  // in int32 too because slot mappings may be int32.
  const int64_t max_blocks = INT32_MAX / block_size;
  if (num_blocks < 2 || num_blocks > max_blocks) {
    throw std::invalid_argument(
        "num_blocks must be in [2, " + std::to_string(max_blocks) +
        "] (it counts the null block 0; slot ids must fit in int32 at block_size " +
        std::to_string(block_size) + "), got " + std::to_string(num_blocks));
  }
  block_size_ = static_cast<int>(block_size);
  blocks_.resize(static_cast<size_t>(num_blocks));
  pending_unref_.assign(static_cast<size_t>(num_blocks), 0);
  if (caching_) {
    cached_tokens_.assign(static_cast<size_t>(num_blocks) * block_size_, 0);
    cached_ = HashIndex(static_cast<size_t>(num_blocks));
  }
  // NOTE: block 0 is the null block: never in the free list, never in a table.
  for (int32_t b = 1; b < num_blocks; ++b) push_free_tail(b);
}

BlockManager::Sequence& BlockManager::get(int64_t seq_id) {
  auto it = seqs_.find(seq_id);
  if (it == seqs_.end()) throw SequenceNotFound(seq_id);
  return it->second;
}

const BlockManager::Sequence& BlockManager::get(int64_t seq_id) const {
  auto it = seqs_.find(seq_id);
  if (it == seqs_.end()) throw SequenceNotFound(seq_id);
  return it->second;
}

int64_t BlockManager::num_tokens(int64_t seq_id) const {
  return static_cast<int64_t>(get(seq_id).tokens.size());
}

std::vector<int32_t> BlockManager::blocks_of(int64_t seq_id) const { return get(seq_id).table; }

std::vector<int64_t> BlockManager::tokens_of(int64_t seq_id) const { return get(seq_id).tokens; }

std::vector<int32_t> BlockManager::free_list() const {
  std::vector<int32_t> out;
  out.reserve(static_cast<size_t>(num_free_));
  for (int32_t b = free_head_; b >= 0; b = blocks_[b].next) out.push_back(b);
  return out;
}

int64_t BlockManager::next_free_blocks(IntOut out) const {
  size_t n = 0;
  for (int32_t b = free_head_; b >= 0 && n < out.size; b = blocks_[b].next) out.set(n++, b);
  return static_cast<int64_t>(n);
}

// ---------------------------------------------------------------------------------------------
// Free list

void BlockManager::push_free_tail(int32_t b) {
  Block& blk = blocks_[b];
  blk.prev = free_tail_;
  blk.next = -1;
  blk.in_free_list = true;
  if (free_tail_ >= 0) {
    blocks_[free_tail_].next = b;
  } else {
    free_head_ = b;
  }
  free_tail_ = b;
  ++num_free_;
}

void BlockManager::remove_free(int32_t b) {
  Block& blk = blocks_[b];
  if (blk.prev >= 0) {
    blocks_[blk.prev].next = blk.next;
  } else {
    free_head_ = blk.next;
  }
  if (blk.next >= 0) {
    blocks_[blk.next].prev = blk.prev;
  } else {
    free_tail_ = blk.prev;
  }
  blk.prev = blk.next = -1;
  blk.in_free_list = false;
  --num_free_;
}

int32_t BlockManager::pop_free_head() {
  const int32_t b = free_head_;
  remove_free(b);
  Block& blk = blocks_[b];
  // Lazy LRU eviction: the block's old K/V is overwritten from now on.
  if (blk.has_hash) drop_hash(b);
  ++blk.gen;
  blk.ref_cnt = 1;
  return b;
}

// ---------------------------------------------------------------------------------------------
// Prefix cache

bool BlockManager::entry_is_live(int32_t b) const {
  const Block& blk = blocks_[b];
  if (blk.parent == 0) return true;
  const Block& parent = blocks_[blk.parent];
  return parent.has_hash && parent.gen == blk.parent_gen;
}

void BlockManager::drop_hash(int32_t b) {
  Block& blk = blocks_[b];
  cached_.erase(blk.hash);
  blk.has_hash = false;
}

void BlockManager::register_block(int32_t b, uint64_t hash, int32_t parent,
                                  const int64_t* tokens) {
  const int32_t old = cached_.find(hash);
  if (old >= 0) {
    // Same content already cached in another block: keep the first one while a lookup can
    // still reach it; an entry whose parent was evicted is dead and gives way.
    if (entry_is_live(old)) return;
    drop_hash(old);
  }
  Block& blk = blocks_[b];
  blk.has_hash = true;
  blk.hash = hash;
  blk.parent = parent;
  blk.parent_gen = blocks_[parent].gen;
  std::memcpy(&cached_tokens_[static_cast<size_t>(b) * block_size_], tokens,
              sizeof(int64_t) * block_size_);
  cached_.insert(hash, b);
}

void BlockManager::hash_full_blocks(Sequence& s) {
  const size_t full = s.tokens.size() / block_size_;
  while (s.hashes.size() < full) {
    const size_t i = s.hashes.size();
    const uint64_t parent_hash = i == 0 ? kRootHash : s.hashes[i - 1];
    const int64_t* toks = s.tokens.data() + i * block_size_;
    const uint64_t h = block_hash(parent_hash, toks, block_size_);
    s.hashes.push_back(h);
    const int32_t b = s.table[i];
    if (!blocks_[b].has_hash) register_block(b, h, i == 0 ? 0 : s.table[i - 1], toks);
  }
}

// ---------------------------------------------------------------------------------------------
// Sequences

void BlockManager::reserve_for_decode(Sequence& s, size_t n) const {
  // Room for the sequence to double before its vectors reallocate: otherwise a batch whose
  // prompts were just allocated reallocates every sequence on its first decode step (~2 us per
  // sequence for a 1k-token prompt, all in one step).
  const size_t tokens = std::max<size_t>(2 * n, 64);
  s.tokens.reserve(tokens);
  s.table.reserve(tokens / block_size_ + 1);
  s.hashes.reserve(tokens / block_size_ + 1);
}

int64_t BlockManager::allocate_prompt(int64_t seq_id, IntSpan tokens) {
  if (seqs_.count(seq_id)) {
    throw std::invalid_argument("sequence id " + std::to_string(seq_id) + " already exists");
  }
  if (tokens.size == 0) {
    throw std::invalid_argument("the prompt of sequence " + std::to_string(seq_id) +
                                " is empty; it needs at least one token");
  }
  const int64_t n = static_cast<int64_t>(tokens.size);
  const int64_t needed = (n + block_size_ - 1) / block_size_;
  if (needed > total_blocks()) {
    throw std::invalid_argument("a prompt of " + std::to_string(n) + " tokens needs " +
                                std::to_string(needed) + " blocks, the pool has only " +
                                std::to_string(total_blocks()) + " (block_size " +
                                std::to_string(block_size_) + ")");
  }
  Sequence s;
  reserve_for_decode(s, static_cast<size_t>(n));
  s.tokens.resize(static_cast<size_t>(n));
  for (size_t i = 0; i < tokens.size; ++i) s.tokens[i] = tokens[i];

  // Longest cached prefix of full blocks, leaving at least the last token to compute.
  std::vector<int32_t> hits;
  if (caching_) {
    const int64_t max_hits = (n - 1) / block_size_;
    uint64_t h = kRootHash;
    int32_t prev = 0;
    for (int64_t i = 0; i < max_hits; ++i) {
      const int64_t* toks = s.tokens.data() + i * block_size_;
      h = block_hash(h, toks, block_size_);
      const int32_t c = cached_.find(h);
      if (c < 0) break;
      const Block& cand = blocks_[c];
      if (cand.parent != prev || cand.parent_gen != blocks_[prev].gen) break;
      if (std::memcmp(&cached_tokens_[static_cast<size_t>(c) * block_size_], toks,
                      sizeof(int64_t) * block_size_) != 0) {
        break;
      }
      hits.push_back(c);
      s.hashes.push_back(h);
      prev = c;
    }
  }
  int64_t take = needed - static_cast<int64_t>(hits.size());
  for (int32_t c : hits) take += blocks_[c].ref_cnt == 0;
  if (take > num_free_) return -1;

  // Hits first, so that popping new blocks cannot evict a block this prompt is reusing.
  for (int32_t c : hits) {
    Block& blk = blocks_[c];
    if (blk.ref_cnt == 0) remove_free(c);
    ++blk.ref_cnt;
    s.table.push_back(c);
  }
  while (static_cast<int64_t>(s.table.size()) < needed) s.table.push_back(pop_free_head());
  if (caching_) hash_full_blocks(s);
  const int64_t cached_tokens = static_cast<int64_t>(hits.size()) * block_size_;
  prefix_hit_tokens_ += cached_tokens;
  seqs_.emplace(seq_id, std::move(s));
  return cached_tokens;
}

void BlockManager::slot_mapping(int64_t seq_id, int64_t start, int64_t end, IntOut out) const {
  const Sequence& s = get(seq_id);
  const int64_t n = static_cast<int64_t>(s.tokens.size());
  if (start < 0 || start > end || end > n) {
    throw std::invalid_argument("slot_mapping range [" + std::to_string(start) + ", " +
                                std::to_string(end) + ") of sequence " +
                                std::to_string(seq_id) + " must satisfy 0 <= start <= end <= " +
                                std::to_string(n) + " (its number of tokens)");
  }
  if (static_cast<int64_t>(out.size) < end - start) {
    throw std::invalid_argument("slot_mapping output holds " + std::to_string(out.size) +
                                " elements, the range needs " + std::to_string(end - start));
  }
  for (int64_t p = start; p < end; ++p) {
    const int64_t slot =
        static_cast<int64_t>(s.table[p / block_size_]) * block_size_ + p % block_size_;
    out.set(static_cast<size_t>(p - start), slot);
  }
}

int64_t BlockManager::plan_append(IntSpan seq_ids) {
  ++batch_stamp_;
  scratch_.clear();
  std::vector<int32_t> touched;
  int64_t needed = 0;
  try {
    for (size_t i = 0; i < seq_ids.size; ++i) {
      const int64_t id = seq_ids[i];
      Sequence& s = get(id);
      if (s.stamp == batch_stamp_) {
        throw std::invalid_argument("sequence id " + std::to_string(id) +
                                    " appears more than once in one append batch (index " +
                                    std::to_string(i) + ")");
      }
      s.stamp = batch_stamp_;
      scratch_.push_back(&s);
      // NOTE: no division on this path: the table is full iff tokens == blocks * block_size.
      if (s.tokens.size() == s.table.size() * static_cast<size_t>(block_size_)) {
        ++needed;  // table full: a new block
      } else {
        // Appends run in batch order: an earlier copy-on-write in this batch drops the
        // shared block's count before a later sequence looks at it.
        const int32_t b = s.table.back();
        if (blocks_[b].ref_cnt - pending_unref_[b] > 1) {
          ++needed;
          if (pending_unref_[b]++ == 0) touched.push_back(b);
        }
      }
    }
  } catch (...) {
    for (int32_t b : touched) pending_unref_[b] = 0;
    throw;
  }
  for (int32_t b : touched) pending_unref_[b] = 0;
  return needed;
}

int64_t BlockManager::blocks_needed_for_append(IntSpan seq_ids) { return plan_append(seq_ids); }

int64_t BlockManager::append_tokens(IntSpan seq_ids, IntSpan tokens, IntOut slots_out,
                                    IntOut cow_out) {
  const size_t batch = seq_ids.size;
  if (tokens.size != batch) {
    throw std::invalid_argument("append_tokens got " + std::to_string(batch) +
                                " sequence ids but " + std::to_string(tokens.size) +
                                " tokens; they must match");
  }
  if (slots_out.size < batch) {
    throw std::invalid_argument("slots_out holds " + std::to_string(slots_out.size) +
                                " elements, the batch needs " + std::to_string(batch));
  }
  if (cow_out.size < 2 * batch) {
    throw std::invalid_argument("cow_out holds " + std::to_string(cow_out.size / 2) +
                                " rows, the batch needs " + std::to_string(batch));
  }
  const int64_t needed = plan_append(seq_ids);
  if (needed > num_free_) return -1;
  int64_t copies = 0;
  for (size_t i = 0; i < batch; ++i) {
    Sequence& s = *scratch_[i];
    const int64_t pos = static_cast<int64_t>(s.tokens.size());
    const int64_t capacity = static_cast<int64_t>(s.table.size()) * block_size_;
    // pos % block_size without a division (the table always covers pos - 1).
    const bool full = pos == capacity;
    const int64_t offset = full ? 0 : pos - (capacity - block_size_);
    if (full) {
      s.table.push_back(pop_free_head());
    } else {
      const int32_t src = s.table.back();
      if (blocks_[src].ref_cnt > 1) {
        // NOTE: a shared block is never written: the sequence gets its own copy first.
        const int32_t dst = pop_free_head();
        --blocks_[src].ref_cnt;
        s.table.back() = dst;
        cow_out.set(static_cast<size_t>(2 * copies), src);
        cow_out.set(static_cast<size_t>(2 * copies + 1), dst);
        ++copies;
      }
    }
    s.tokens.push_back(tokens[i]);
    slots_out.set(i, static_cast<int64_t>(s.table.back()) * block_size_ + offset);
    if (caching_ && offset == block_size_ - 1) hash_full_blocks(s);
  }
  return copies;
}

void BlockManager::fork(int64_t parent_id, int64_t child_id) {
  const Sequence& parent = get(parent_id);
  if (seqs_.count(child_id)) {
    throw std::invalid_argument("cannot fork into sequence id " + std::to_string(child_id) +
                                ": it already exists");
  }
  Sequence child;
  reserve_for_decode(child, parent.tokens.size());
  child.tokens = parent.tokens;
  child.table = parent.table;
  child.hashes = parent.hashes;
  for (int32_t b : child.table) ++blocks_[b].ref_cnt;
  seqs_.emplace(child_id, std::move(child));
}

void BlockManager::free(int64_t seq_id) {
  auto it = seqs_.find(seq_id);
  if (it == seqs_.end()) throw SequenceNotFound(seq_id);
  const std::vector<int32_t>& table = it->second.table;
  for (auto b = table.rbegin(); b != table.rend(); ++b) {
    if (--blocks_[*b].ref_cnt == 0) push_free_tail(*b);
  }
  seqs_.erase(it);
}

void BlockManager::block_tables(IntSpan seq_ids, int32_t* out, int64_t max_blocks,
                                int64_t row_stride) {
  for (size_t i = 0; i < seq_ids.size; ++i) {
    const Sequence& s = get(seq_ids[i]);
    const int64_t len = static_cast<int64_t>(s.table.size());
    if (len > max_blocks) {
      throw std::invalid_argument("sequence " + std::to_string(seq_ids[i]) + " has " +
                                  std::to_string(len) + " blocks, the block table buffer has " +
                                  std::to_string(max_blocks) + " columns");
    }
    int32_t* row = out + static_cast<int64_t>(i) * row_stride;
    std::memcpy(row, s.table.data(), sizeof(int32_t) * static_cast<size_t>(len));
    std::memset(row + len, 0, sizeof(int32_t) * static_cast<size_t>(max_blocks - len));
  }
}

void BlockManager::reset_prefix_cache() {
  cached_.for_each([this](uint64_t, int32_t b) { blocks_[b].has_hash = false; });
  cached_.clear();
}

void BlockManager::check_invariants() const {
  const int64_t nb = num_blocks();
  const Block& null_block = blocks_[0];
  if (null_block.ref_cnt != 0 || null_block.in_free_list || null_block.has_hash) {
    invariant_failed("the null block 0 is in use, free or cached (ref_cnt " +
                     std::to_string(null_block.ref_cnt) + ")");
  }
  std::vector<int32_t> owners(static_cast<size_t>(nb), 0);
  for (const auto& entry : seqs_) {
    const Sequence& s = entry.second;
    const size_t expect = (s.tokens.size() + block_size_ - 1) / block_size_;
    if (s.table.size() != expect) {
      invariant_failed("sequence " + std::to_string(entry.first) + " has " +
                       std::to_string(s.tokens.size()) + " tokens but " +
                       std::to_string(s.table.size()) + " blocks (expected " +
                       std::to_string(expect) + ")");
    }
    if (s.tokens.empty()) {
      invariant_failed("sequence " + std::to_string(entry.first) + " has no tokens");
    }
    for (int32_t b : s.table) {
      if (b <= 0 || b >= nb) {
        invariant_failed("sequence " + std::to_string(entry.first) + " holds block id " +
                         std::to_string(b) + " outside [1, " + std::to_string(nb) + ")");
      }
      ++owners[b];
    }
  }
  for (int32_t b = 1; b < nb; ++b) {
    const Block& blk = blocks_[b];
    if (blk.ref_cnt != owners[b]) {
      invariant_failed("block " + std::to_string(b) + " has ref_cnt " +
                       std::to_string(blk.ref_cnt) + " but " + std::to_string(owners[b]) +
                       " block tables hold it");
    }
    if (blk.in_free_list != (blk.ref_cnt == 0)) {
      invariant_failed("block " + std::to_string(b) + " has ref_cnt " +
                       std::to_string(blk.ref_cnt) + " and in_free_list " +
                       (blk.in_free_list ? "true" : "false"));
    }
  }
  int64_t count = 0;
  int32_t prev = -1;
  for (int32_t b = free_head_; b >= 0; b = blocks_[b].next) {
    if (b == 0 || b >= nb) invariant_failed("free list holds block id " + std::to_string(b));
    if (!blocks_[b].in_free_list) {
      invariant_failed("block " + std::to_string(b) + " is linked in the free list but flagged "
                       "as not free");
    }
    if (blocks_[b].prev != prev) {
      invariant_failed("free list back link of block " + std::to_string(b) + " is " +
                       std::to_string(blocks_[b].prev) + ", expected " + std::to_string(prev));
    }
    if (++count > nb) invariant_failed("free list has a cycle");
    prev = b;
  }
  if (prev != free_tail_) {
    invariant_failed("free list ends at block " + std::to_string(prev) + " but the tail is " +
                     std::to_string(free_tail_));
  }
  if (count != num_free_) {
    invariant_failed("free list holds " + std::to_string(count) + " blocks but num_free is " +
                     std::to_string(num_free_));
  }
  int64_t hashed = 0;
  for (int32_t b = 0; b < nb; ++b) hashed += blocks_[b].has_hash;
  if (hashed != static_cast<int64_t>(cached_.size())) {
    invariant_failed(std::to_string(hashed) + " blocks are flagged cached but the hash map has " +
                     std::to_string(cached_.size()) + " entries");
  }
  cached_.for_each([this, nb](uint64_t hash, int32_t b) {
    if (b <= 0 || b >= nb || !blocks_[b].has_hash || blocks_[b].hash != hash) {
      invariant_failed("hash map entry for block " + std::to_string(b) +
                       " does not match the block's own hash");
    }
    if (cached_.find(hash) != b) {
      invariant_failed("hash map entry for block " + std::to_string(b) + " is unreachable");
    }
  });
  if (!caching_ && cached_.size() != 0) {
    invariant_failed("prefix caching is off but blocks are cached");
  }
}

}  // namespace gptfast
