// peft::BatchShards: p ranks together process exactly the batches one rank would, in the same order.
#include "support/catch.hpp"

#include <peft/distributed/shard.hpp>

#include <algorithm>
#include <cmath>
#include <map>
#include <numeric>
#include <vector>

using peft::BatchShards;
using peft::Index;

namespace {

// Every rank's share of every step of one epoch, concatenated in (step, rank) order.
std::vector<Index> concatenated(Index n, Index batch, int world, std::uint64_t seed, int epoch) {
  std::vector<BatchShards> ranks;
  for (int r = 0; r < world; ++r) {
    ranks.emplace_back(n, batch, r, world, seed);
    ranks.back().start_epoch(epoch);
  }
  std::vector<Index> out;
  for (Index step = 0; step < ranks[0].steps_per_epoch(); ++step) {
    Index in_step = 0;
    Index smallest = n, largest = 0;
    for (int r = 0; r < world; ++r) {
      const BatchShards::Slice s = ranks[std::size_t(r)].local_batch(step);
      out.insert(out.end(), s.begin(), s.end());
      in_step += s.size();
      smallest = std::min(smallest, s.size());
      largest = std::max(largest, s.size());
    }
    REQUIRE(in_step == ranks[0].global_batch_size(step));
    REQUIRE(largest - smallest <= 1);  // as even as it gets
  }
  return out;
}

}  // namespace

TEST_CASE("the ranks' shares of each step are one rank's batch, whatever the world size") {
  for (Index n : {0, 1, 7, 128, 1000, 1001}) {
    for (Index batch : {1, 5, 64, 128}) {
      const std::vector<Index> one = concatenated(n, batch, 1, 42, 3);
      // One rank: the epoch's permutation, each index once.
      std::vector<Index> sorted = one, all(static_cast<std::size_t>(n));
      std::sort(sorted.begin(), sorted.end());
      std::iota(all.begin(), all.end(), Index(0));
      REQUIRE(sorted == all);
      for (int world : {2, 3, 8, 200}) REQUIRE(concatenated(n, batch, world, 42, 3) == one);
    }
  }
}

TEST_CASE("the last batch may be short, and a rank's share of it empty") {
  BatchShards s(10, 4, 2, 3, 1);
  REQUIRE(s.steps_per_epoch() == 3);
  REQUIRE(s.global_batch_size(0) == 4);
  REQUIRE(s.global_batch_size(2) == 2);
  REQUIRE(s.local_batch(0).size() == 1);   // 4 over 3 ranks: 2, 1, 1
  REQUIRE(s.local_batch(0, 0).size() == 2);
  REQUIRE(s.local_batch(2).empty());       // 2 over 3 ranks: 1, 1, 0
  REQUIRE(s.local_batch(2, 1).size() == 1);
}

TEST_CASE("each epoch's order depends on the seed and the epoch alone") {
  BatchShards a(500, 32, 0, 2, 7), b(500, 32, 1, 4, 7), other_seed(500, 32, 0, 2, 8);
  a.start_epoch(5);
  b.start_epoch(5);
  other_seed.start_epoch(5);
  REQUIRE(a.epoch() == 5);
  REQUIRE(a.epoch_order() == b.epoch_order());
  REQUIRE(a.epoch_order() != other_seed.epoch_order());
  const std::vector<Index> fifth = a.epoch_order();
  a.start_epoch(6);
  REQUIRE(a.epoch_order() != fifth);
  a.start_epoch(5);
  REQUIRE(a.epoch_order() == fifth);  // reproducible
  // The shuffle moves most of the examples.
  Index fixed = 0;
  for (Index i = 0; i < 500; ++i) fixed += fifth[std::size_t(i)] == i;
  REQUIRE(fixed < 20);

  BatchShards ordered(9, 4, 0, 1, 7, /*shuffle=*/false);
  ordered.start_epoch(3);
  std::vector<Index> identity(9);
  std::iota(identity.begin(), identity.end(), Index(0));
  REQUIRE(ordered.epoch_order() == identity);
}

TEST_CASE("BatchShards refuses what it cannot plan") {
  REQUIRE_THROWS_AS(BatchShards(-1, 4, 0, 1, 0), peft::ConfigError);
  REQUIRE_THROWS_AS(BatchShards(10, 0, 0, 1, 0), peft::ConfigError);
  REQUIRE_THROWS_AS(BatchShards(10, 4, 0, 0, 0), peft::ConfigError);
  REQUIRE_THROWS_AS(BatchShards(10, 4, 2, 2, 0), peft::ConfigError);
  REQUIRE_THROWS_AS(BatchShards(10, 4, -1, 2, 0), peft::ConfigError);
  const BatchShards s(10, 4, 1, 2, 0);
  REQUIRE_THROWS_WITH(s.local_batch(3), peft::test::has_substring("step is 3, expected in [0, 3)"));
  REQUIRE_THROWS_AS(s.local_batch(-1), peft::ConfigError);
  REQUIRE_THROWS_AS(s.local_batch(0, 2), peft::ConfigError);
  REQUIRE_THROWS_AS(s.global_batch_size(3), peft::ConfigError);
}

TEST_CASE("every order of a small dataset is drawn equally often, the identity included") {
  // A uniform shuffle draws each of the n! orders with probability 1/n!. Over 24 000 epochs of 4
  // examples each of the 24 orders is expected 1 000 times; Pearson's statistic over them has 23 degrees
  // of freedom, and exceeds 75 with probability 2e-7 (the draws are seeded: the test is
  // deterministic). A shuffle that can never leave an example in place (Sattolo's, j drawn from [0, i)
  // instead of [0, i]) draws only the 6 cyclic orders, and an off-by-one that never moves the first
  // example draws 6 of the 24; both give statistics in the tens of thousands.
  constexpr Index n = 4;
  constexpr int epochs = 24000;
  std::map<std::vector<Index>, int> seen;
  BatchShards s(n, 2, 0, 1, 2024);
  for (int e = 0; e < epochs; ++e) {
    s.start_epoch(e);
    ++seen[s.epoch_order()];
  }
  REQUIRE(seen.size() == 24);
  const double expected = epochs / 24.0;
  double chi2 = 0;
  for (const auto& [order, count] : seen) chi2 += (count - expected) * (count - expected) / expected;
  INFO("chi-squared " << chi2 << " over 23 degrees of freedom");
  REQUIRE(chi2 < 75);
  std::vector<Index> identity(n);
  std::iota(identity.begin(), identity.end(), Index(0));
  REQUIRE(seen.count(identity) == 1);

  // On a larger dataset, each example lands in each position equally often: over 20 000 epochs of 10,
  // the count of example i at position k is binomial(20 000, 1/10), 2 000 ± 42.4 (one standard
  // deviation); 7 deviations is never reached by chance.
  constexpr Index m = 10;
  constexpr int long_epochs = 20000;
  std::vector<int> at(m * m, 0);
  BatchShards t(m, 3, 0, 1, 77);
  for (int e = 0; e < long_epochs; ++e) {
    t.start_epoch(e);
    for (Index k = 0; k < m; ++k) ++at[std::size_t(t.epoch_order()[std::size_t(k)] * m + k)];
  }
  const double mean = long_epochs / double(m), sd = std::sqrt(long_epochs * 0.1 * 0.9);
  for (Index i = 0; i < m; ++i)
    for (Index k = 0; k < m; ++k) {
      INFO("example " << i << " at position " << k);
      REQUIRE(std::abs(at[std::size_t(i * m + k)] - mean) < 7 * sd);
    }
}
