#pragma once
/// \file shard.hpp
/// \brief Which examples each rank of a data-parallel run processes: one global order per epoch, the
/// same on every rank, cut into global batches, each batch split between the ranks.
///
/// Needs nothing but the core (no MPI), so a program can plan its shards, and a test can check them,
/// anywhere. peft/distributed/mpi.hpp averages the gradients the ranks compute on their shards.
///
/// Global batch k of an epoch is the examples order[k B, min((k + 1) B, n)) of that epoch's
/// permutation; rank r of p takes a contiguous slice of it, the first (b mod p) ranks one example more
/// than the others (b the batch's size). So p ranks together process exactly the batches one rank
/// would, in the same order, whatever p: with gradients weighted by each rank's share
/// (DataParallel::average_gradients), the step is the one-rank step up to rounding. The last batch of
/// an epoch may be short, and a rank's share of it may be empty; nothing is repeated or dropped
/// (unlike PyTorch's DistributedSampler, which pads the epoch with repeated examples).

#include "peft/core/config.hpp"  // first: the detail headers check for it
#include "peft/core/error.hpp"
#include "peft/core/random.hpp"
#include "peft/core/types.hpp"
#include "peft/detail/hash.hpp"

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

namespace peft {

/// \brief This rank's share of each global batch, epoch after epoch (see the file's description).
///
///     peft::BatchShards shards(n, 128, rank, world_size, seed);
///     for (int epoch = 0; epoch < epochs; ++epoch) {
///       shards.start_epoch(epoch);
///       for (Index step = 0; step < shards.steps_per_epoch(); ++step) {
///         for (Index i : shards.local_batch(step)) ...  // the examples this rank processes
///         dp.average_gradients(shards.local_batch(step).size());
///       }
///     }
class BatchShards {
 public:
  /// The indices of one rank's share of a global batch, valid until the next start_epoch().
  struct Slice {
    const Index* first = nullptr;
    Index count = 0;

    const Index* begin() const { return first; }
    const Index* end() const { return first + count; }
    Index size() const { return count; }
    bool empty() const { return count == 0; }
    Index operator[](Index i) const { return first[i]; }
  };

  /// \param dataset_size examples in the dataset (indices 0 .. dataset_size - 1)
  /// \param global_batch examples per step over all ranks together
  /// \param rank this rank, in [0, world_size)
  /// \param world_size the number of ranks
  /// \param seed the shuffle's seed; every rank must pass the same one
  /// \param shuffle false keeps the dataset's order in every epoch
  /// \throws ConfigError for a negative size, a batch < 1, world_size < 1, or a rank outside [0, world_size).
  BatchShards(Index dataset_size, Index global_batch, int rank, int world_size, std::uint64_t seed,
              bool shuffle = true)
      : n_(dataset_size), batch_(global_batch), rank_(rank), size_(world_size), seed_(seed), shuffle_(shuffle) {
    const detail::Where w{"peft::BatchShards", "BatchShards"};
    if (dataset_size < 0) detail::raise<ConfigError>(w, "dataset_size is ", dataset_size, ", expected >= 0");
    if (global_batch < 1) detail::raise<ConfigError>(w, "global_batch is ", global_batch, ", expected >= 1");
    if (world_size < 1) detail::raise<ConfigError>(w, "world_size is ", world_size, ", expected >= 1");
    if (rank < 0 || rank >= world_size)
      detail::raise<ConfigError>(w, "rank is ", rank, ", expected in [0, ", world_size, ")");
    order_.resize(static_cast<std::size_t>(n_));
    start_epoch(0);
  }

  /// \brief Draws epoch `epoch`'s global order: a Fisher-Yates shuffle seeded by (seed, epoch) alone, so
  /// every rank, every run and any world size draws the same one.
  void start_epoch(std::int64_t epoch) {
    epoch_ = epoch;
    for (Index i = 0; i < n_; ++i) order_[static_cast<std::size_t>(i)] = i;
    if (!shuffle_) return;
    Rng rng(detail::splitmix64(detail::splitmix64(seed_) ^ static_cast<std::uint64_t>(epoch)));
    for (Index i = n_ - 1; i > 0; --i) {
      const Index j = std::min(i, static_cast<Index>(rng.uniform() * static_cast<double>(i + 1)));
      std::swap(order_[static_cast<std::size_t>(i)], order_[static_cast<std::size_t>(j)]);
    }
  }

  /// \returns the epoch start_epoch() last drew (0 after construction).
  std::int64_t epoch() const { return epoch_; }
  /// \returns ceil(dataset_size / global_batch): the last batch may be short.
  Index steps_per_epoch() const { return (n_ + batch_ - 1) / batch_; }
  /// \returns the size of global batch `step` (global_batch, or less for the last one).
  Index global_batch_size(Index step) const {
    check_step(step);
    return std::min(batch_, n_ - step * batch_);
  }
  /// \returns this rank's share of global batch `step`: indices into the dataset (maybe none).
  /// \throws ConfigError unless 0 <= step < steps_per_epoch().
  Slice local_batch(Index step) const { return local_batch(step, rank_); }
  /// \returns rank `rank`'s share of global batch `step`.
  Slice local_batch(Index step, int rank) const {
    const Index b = global_batch_size(step);
    if (rank < 0 || rank >= size_)
      detail::raise<ConfigError>(detail::Where{"peft::BatchShards", "local_batch"}, "rank is ", rank,
                                 ", expected in [0, ", size_, ")");
    const Index p = size_, r = rank, base = b / p, extra = b % p;
    const Index first = step * batch_ + r * base + std::min(r, extra);
    return Slice{order_.data() + first, base + (r < extra ? 1 : 0)};
  }
  /// \returns the whole epoch's order (the same on every rank).
  const std::vector<Index>& epoch_order() const { return order_; }

  int rank() const { return rank_; }
  int world_size() const { return size_; }

 private:
  void check_step(Index step) const {
    if (step < 0 || step >= steps_per_epoch())
      detail::raise<ConfigError>(detail::Where{"peft::BatchShards", "local_batch"}, "step is ", step,
                                 ", expected in [0, ", steps_per_epoch(), ")");
  }

  Index n_, batch_;
  int rank_, size_;
  std::uint64_t seed_;
  bool shuffle_;
  std::int64_t epoch_ = 0;
  std::vector<Index> order_;
};

}  // namespace peft
