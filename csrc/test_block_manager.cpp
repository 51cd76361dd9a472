// Stand-alone test of the block manager core (no Python): focused cases, then thousands of
// random operations with check_invariants() after each. Built by CMake as
// test_block_manager; GPTFAST_SANITIZE=ON builds it with ASan + UBSan. Exit code 0 = pass.
#include <cstdio>
#include <cstdlib>
#include <map>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "block_manager.h"

using gptfast::BlockManager;
using gptfast::IntOut;
using gptfast::IntSpan;

namespace {

int failures = 0;

#define CHECK(cond)                                                            \
  do {                                                                         \
    if (!(cond)) {                                                             \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      ++failures;                                                              \
    }                                                                          \
  } while (0)

template <typename E, typename F>
bool throws(F&& f) {
  try {
    f();
  } catch (const E&) {
    return true;
  } catch (...) {
    return false;
  }
  return false;
}

IntSpan span(const std::vector<int64_t>& v) { return IntSpan{v.data(), v.size(), true}; }

std::vector<int64_t> iota(int64_t n, int64_t start = 0) {
  std::vector<int64_t> v(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) v[i] = start + i;
  return v;
}

int64_t append(BlockManager& bm, const std::vector<int64_t>& ids, const std::vector<int64_t>& toks,
               std::vector<int64_t>& slots, std::vector<int64_t>& cow) {
  slots.assign(ids.size(), -1);
  cow.assign(2 * ids.size(), -1);
  return bm.append_tokens(span(ids), span(toks), IntOut{slots.data(), slots.size(), true},
                          IntOut{cow.data(), cow.size(), true});
}

void test_basics() {
  BlockManager bm(9, 4, true);  // 8 usable blocks
  CHECK(bm.total_blocks() == 8 && bm.num_free_blocks() == 8);
  CHECK(bm.allocate_prompt(1, span(iota(10))) == 0);
  CHECK((bm.blocks_of(1) == std::vector<int32_t>{1, 2, 3}));
  CHECK(bm.num_cached_blocks() == 2);  // two full blocks
  std::vector<int64_t> slots(10);
  bm.slot_mapping(1, 0, 10, IntOut{slots.data(), slots.size(), true});
  CHECK(slots[0] == 4 && slots[4] == 8 && slots[9] == 13);
  // Same prompt: two full blocks hit, the last partial block is new.
  CHECK(bm.allocate_prompt(2, span(iota(10))) == 8);
  CHECK((bm.blocks_of(2) == std::vector<int32_t>{1, 2, 4}));
  CHECK(bm.prefix_hit_tokens() == 8);
  // A prompt of exactly two blocks hits only one: its last token must be computed.
  CHECK(bm.allocate_prompt(3, span(iota(8))) == 4);
  bm.check_invariants();
  CHECK(throws<std::invalid_argument>([&] { bm.allocate_prompt(3, span(iota(2))); }));
  CHECK(throws<std::invalid_argument>([&] { bm.allocate_prompt(9, span({})); }));
  CHECK(throws<std::invalid_argument>([&] { bm.allocate_prompt(9, span(iota(33))); }));
  CHECK(throws<gptfast::SequenceNotFound>([&] { bm.free(42); }));
  bm.free(1);
  CHECK(throws<gptfast::SequenceNotFound>([&] { bm.free(1); }));
  bm.free(2);
  bm.free(3);
  CHECK(bm.num_free_blocks() == 8 && bm.num_sequences() == 0);
  bm.check_invariants();
}

void test_reverse_free_and_lru() {
  BlockManager bm(9, 2, true);
  CHECK(bm.allocate_prompt(1, span(iota(6, 100))) == 0);  // blocks 1, 2, 3 (all full)
  CHECK(bm.allocate_prompt(2, span(iota(3, 200))) == 0);  // blocks 4, 5
  bm.free(1);  // free list: 6 7 8 3 2 1
  bm.free(2);  // free list: 6 7 8 3 2 1 5 4
  CHECK(bm.num_cached_blocks() == 4);  // 1, 2, 3 and 4 still cached
  // Four new blocks: 6 7 8 (uncached) then 3, whose cached hash is evicted.
  CHECK(bm.allocate_prompt(3, span(iota(8, 300))) == 0);
  CHECK((bm.blocks_of(3) == std::vector<int32_t>{6, 7, 8, 3}));
  // Blocks 1 and 2 still cached: the old prompt's first four tokens hit, taking them off the
  // middle of the free list.
  CHECK(bm.allocate_prompt(4, span(iota(6, 100))) == 4);
  CHECK((bm.blocks_of(4) == std::vector<int32_t>{1, 2, 5}));
  bm.check_invariants();
}

void test_copy_on_write() {
  BlockManager bm(9, 4, true);
  CHECK(bm.allocate_prompt(1, span(iota(6))) == 0);  // blocks 1, 2 (2 holds 2 tokens)
  bm.fork(1, 2);
  std::vector<int64_t> slots, cow;
  CHECK(bm.blocks_needed_for_append(span({1, 2})) == 1);
  CHECK(append(bm, {1, 2}, {7, 7}, slots, cow) == 1);
  // Sequence 1 copies block 2 into block 3; sequence 2 then owns block 2 alone.
  CHECK(cow[0] == 2 && cow[1] == 3);
  CHECK(slots[0] == 3 * 4 + 2 && slots[1] == 2 * 4 + 2);
  CHECK((bm.blocks_of(1) == std::vector<int32_t>{1, 3}));
  CHECK((bm.blocks_of(2) == std::vector<int32_t>{1, 2}));
  CHECK(throws<std::invalid_argument>([&] { append(bm, {1, 1}, {0, 0}, slots, cow); }));
  bm.check_invariants();
}

void test_all_or_nothing() {
  BlockManager bm(4, 2, true);  // 3 usable blocks
  CHECK(bm.allocate_prompt(1, span(iota(4))) == 0);  // 2 blocks
  const auto before = bm.blocks_of(1);
  CHECK(bm.allocate_prompt(2, span(iota(3, 50))) == -1);  // needs 2, 1 free
  CHECK(!bm.has_sequence(2) && bm.num_free_blocks() == 1);
  CHECK(bm.allocate_prompt(2, span(iota(1, 50))) == 0);
  std::vector<int64_t> slots, cow;
  CHECK(append(bm, {1, 2}, {5, 5}, slots, cow) == -1);  // 1 needs a block, none free
  CHECK(bm.blocks_of(1) == before && bm.num_tokens(1) == 4 && bm.num_tokens(2) == 1);
  bm.check_invariants();
}

// The open-addressing index against std::map, with keys crowded into few home slots so that
// probe runs wrap around and backward-shift deletion is exercised.
void test_hash_index() {
  std::mt19937_64 rng(7);
  gptfast::HashIndex index(20);  // capacity 64
  std::map<uint64_t, int32_t> ref;
  for (int step = 0; step < 200000; ++step) {
    const uint64_t key = (rng() % 48) * 64 + (rng() % 6 == 0 ? 0 : 60 + rng() % 4);
    auto it = ref.find(key);
    if (it == ref.end()) {
      if (ref.size() < 20) {
        const int32_t value = static_cast<int32_t>(rng() % 1000);
        index.insert(key, value);
        ref[key] = value;
      }
    } else {
      index.erase(key);
      ref.erase(it);
    }
    if (step % 97 == 0) {
      CHECK(index.size() == ref.size());
      for (const auto& entry : ref) CHECK(index.find(entry.first) == entry.second);
      CHECK(index.find(key + 1) == (ref.count(key + 1) ? ref[key + 1] : -1));
    }
  }
  size_t visited = 0;
  index.for_each([&](uint64_t key, int32_t value) {
    ++visited;
    CHECK(ref.count(key) && ref[key] == value);
  });
  CHECK(visited == ref.size());
  index.clear();
  CHECK(index.size() == 0 && index.find(ref.empty() ? 0 : ref.begin()->first) == -1);
}

void test_random(uint64_t seed, int steps) {
  std::mt19937_64 rng(seed);
  auto uniform = [&](int64_t lo, int64_t hi) {  // inclusive
    return std::uniform_int_distribution<int64_t>(lo, hi)(rng);
  };
  const int block_size = static_cast<int>(uniform(1, 8));
  const bool caching = uniform(0, 3) != 0;
  BlockManager bm(uniform(2, 64), block_size, caching);
  std::map<int64_t, std::vector<int64_t>> live;  // seq id -> its tokens (the model of tokens)
  int64_t next_id = 0;
  std::vector<int64_t> slots, cow;
  for (int step = 0; step < steps; ++step) {
    const int64_t op = uniform(0, 9);
    if (op <= 2) {
      // Prompts from a tiny alphabet with shared beginnings, so prefix hits happen.
      std::vector<int64_t> prompt(static_cast<size_t>(uniform(1, 5 * block_size)));
      for (auto& t : prompt) t = uniform(0, 2);
      const int64_t free_before = bm.num_free_blocks();
      int64_t got = -2;
      try {
        got = bm.allocate_prompt(next_id, span(prompt));
      } catch (const std::invalid_argument&) {
        CHECK(static_cast<int64_t>((prompt.size() + block_size - 1) / block_size) >
              bm.total_blocks());
        continue;
      }
      if (got < 0) {
        CHECK(bm.num_free_blocks() == free_before && !bm.has_sequence(next_id));
      } else {
        CHECK(got % block_size == 0 && got < static_cast<int64_t>(prompt.size()));
        live[next_id] = prompt;
      }
      ++next_id;
    } else if (op <= 5 && !live.empty()) {
      std::vector<int64_t> ids, toks;
      for (const auto& entry : live) {
        if (uniform(0, 1)) {
          ids.push_back(entry.first);
          toks.push_back(uniform(0, 2));
        }
      }
      const int64_t need = bm.blocks_needed_for_append(span(ids));
      const int64_t free_before = bm.num_free_blocks();
      const int64_t k = append(bm, ids, toks, slots, cow);
      CHECK((k < 0) == (need > free_before));
      if (k >= 0) {
        CHECK(bm.num_free_blocks() == free_before - need);
        for (size_t i = 0; i < ids.size(); ++i) {
          auto& t = live[ids[i]];
          t.push_back(toks[i]);
          const auto table = bm.blocks_of(ids[i]);
          const int64_t p = static_cast<int64_t>(t.size()) - 1;
          CHECK(slots[i] == table[p / block_size] * block_size + p % block_size);
        }
        for (int64_t c = 0; c < k; ++c) CHECK(cow[2 * c] != cow[2 * c + 1] && cow[2 * c] > 0);
      }
    } else if (op == 6 && !live.empty()) {
      auto it = live.begin();
      std::advance(it, uniform(0, static_cast<int64_t>(live.size()) - 1));
      bm.fork(it->first, next_id);
      live[next_id] = it->second;
      ++next_id;
    } else if (op <= 8 && !live.empty()) {
      auto it = live.begin();
      std::advance(it, uniform(0, static_cast<int64_t>(live.size()) - 1));
      bm.free(it->first);
      live.erase(it);
    } else if (op == 9) {
      CHECK(throws<gptfast::SequenceNotFound>([&] { bm.free(next_id + 1000); }));
      if (uniform(0, 20) == 0) bm.reset_prefix_cache();
    }
    bm.check_invariants();
    // Every token the manager holds equals the test's own record of it.
    for (const auto& entry : live) CHECK(bm.tokens_of(entry.first) == entry.second);
    // A block never appears twice in one table.
    for (const auto& entry : live) {
      const auto table = bm.blocks_of(entry.first);
      CHECK(std::set<int32_t>(table.begin(), table.end()).size() == table.size());
    }
  }
  for (const auto& entry : live) bm.free(entry.first);
  CHECK(bm.num_free_blocks() == bm.total_blocks());
  bm.check_invariants();
}

}  // namespace

int main(int argc, char** argv) {
  const int seeds = argc > 1 ? std::atoi(argv[1]) : 200;
  test_basics();
  test_reverse_free_and_lru();
  test_copy_on_write();
  test_all_or_nothing();
  test_hash_index();
  for (int s = 0; s < seeds; ++s) test_random(static_cast<uint64_t>(s), 500);
  if (failures) {
    std::fprintf(stderr, "test_block_manager: %d check(s) failed\n", failures);
    return 1;
  }
  std::printf("test_block_manager: all checks passed (%d random runs x 500 ops)\n", seeds);
  return 0;
}
