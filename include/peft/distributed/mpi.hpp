#pragma once
/// \file mpi.hpp
/// \brief Data-parallel training with MPI: every rank holds the frozen model and the same adapters,
/// processes its share of each global batch (peft::BatchShards), and the gradients of everything the
/// optimizer has registered are averaged before each step.
///
///     peft::AdamW<float> opt(cfg);
///     opt.add(fc1); opt.add(fc2); ...                    // the same registrations on every rank
///     peft::mpi::DataParallel<peft::AdamW<float>> dp(opt);  // collective: checks, then rank 0's values
///     for (...) {
///       opt.zero_grad();
///       ... forward and backward of this rank's examples, loss averaged over them ...
///       dp.average_gradients(local_examples);            // one allreduce (per bucket)
///       dp.clip_grad_norm(1.0f);                         // optional: the global norm, the same on every rank
///       opt.step();
///     }
///
/// The CMake target `peft::mpi` (there when MPI is found) adds MPI to peft::peft; nothing else in the
/// library depends on MPI. MPI must be initialized before a DataParallel is built and finalized after
/// the last one is destroyed (peft::mpi::Session does both). Every member function but the accessors is
/// collective: each rank must call it, in the same order. Every check whose outcome could differ
/// between ranks is settled collectively, so a bad input raises the same kind of error on every rank
/// instead of leaving the others waiting in a collective call.

#include "peft/core/config.hpp"  // first: the detail headers check for it
#include "peft/core/error.hpp"
#include "peft/core/types.hpp"
#include "peft/detail/hash.hpp"
#include "peft/distributed/shard.hpp"
#include "peft/optim/optimizer.hpp"

#include <mpi.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace peft {
namespace mpi {

namespace detail {

using peft::detail::raise;
using peft::detail::Where;

/// Throws CommError naming the MPI call and MPI's reason unless rc is MPI_SUCCESS.
inline void check(int rc, const Where& where, const char* call) {
  if (rc == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING];
  int length = 0;
  if (MPI_Error_string(rc, text, &length) != MPI_SUCCESS) length = 0;
  raise<CommError>(where, call, " failed: ", length > 0 ? std::string(text, static_cast<std::size_t>(length))
                                                        : "error code " + std::to_string(rc));
}

template <class Scalar>
MPI_Datatype datatype() {
  static_assert(std::is_same<Scalar, float>::value || std::is_same<Scalar, double>::value,
                "peft::mpi: parameters must be float or double");
  return std::is_same<Scalar, float>::value ? MPI_FLOAT : MPI_DOUBLE;
}

/// Hashes the bits of n scalars eight bytes at a time (a bit-exact comparison, not a cryptographic one).
template <class Scalar>
std::uint64_t hash_bits(const Scalar* data, Index n, std::uint64_t h) {
  const std::size_t bytes = static_cast<std::size_t>(n) * sizeof(Scalar);
  const auto* p = reinterpret_cast<const unsigned char*>(data);
  std::size_t i = 0;
  for (; i + 8 <= bytes; i += 8) {
    std::uint64_t word;
    std::memcpy(&word, p + i, 8);
    h = (h ^ word) * 0x9E3779B97F4A7C15ull;
    h ^= h >> 29;
  }
  return peft::detail::fnv1a(p + i, bytes - i, h);
}

/// Broadcasts `count` scalars from root, in calls of at most INT_MAX elements.
template <class Scalar>
void broadcast_scalars(Scalar* data, Index count, int root, MPI_Comm comm, const Where& where) {
  for (Index done = 0; done < count;) {
    const int n = static_cast<int>(std::min<Index>(count - done, INT_MAX));
    check(MPI_Bcast(data + done, n, datatype<Scalar>(), root, comm), where, "MPI_Bcast");
    done += n;
  }
}

}  // namespace detail

/// \brief MPI_Init_thread (MPI_THREAD_FUNNELED: MPI called from the main thread only, while Eigen and
/// OpenBLAS may run threads of their own) in the constructor and MPI_Finalize in the destructor, unless
/// MPI was already initialized when it was built (then the program owns MPI's lifetime).
class Session {
 public:
  /// \throws CommError if MPI cannot be initialized.
  Session(int& argc, char**& argv) {
    int initialized = 0;
    MPI_Initialized(&initialized);
    if (initialized) return;
    int provided = 0;
    detail::check(MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided),
                  detail::Where{"peft::mpi::Session", "Session"}, "MPI_Init_thread");
    owns_ = true;
  }
  ~Session() {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (owns_ && !finalized) MPI_Finalize();
  }
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;

  /// \returns this process's rank in MPI_COMM_WORLD.
  int rank() const {
    int r = 0;
    MPI_Comm_rank(MPI_COMM_WORLD, &r);
    return r;
  }
  /// \returns the number of processes in MPI_COMM_WORLD.
  int size() const {
    int s = 1;
    MPI_Comm_size(MPI_COMM_WORLD, &s);
    return s;
  }

 private:
  bool owns_ = false;
};

/// \brief Broadcasts a dense Eigen matrix (or vector) from `root`: on every other rank it is resized to
/// the root's shape and receives the root's values, e.g. the frozen base weights that rank 0 loaded
/// or trained. Collective.
/// \throws ShapeError on every rank if a rank's matrix has a fixed size other than the root's;
/// CommError if MPI fails.
template <class Derived>
void broadcast(Eigen::PlainObjectBase<Derived>& m, MPI_Comm comm = MPI_COMM_WORLD, int root = 0) {
  const detail::Where w{"peft::mpi", "broadcast"};
  long long shape[2] = {static_cast<long long>(m.rows()), static_cast<long long>(m.cols())};
  detail::check(MPI_Bcast(shape, 2, MPI_LONG_LONG, root, comm), w, "MPI_Bcast");
  int bad = 0;
  const Index rows = static_cast<Index>(shape[0]), cols = static_cast<Index>(shape[1]);
  if (m.rows() != rows || m.cols() != cols) {
    const bool resizable = (Derived::RowsAtCompileTime == Eigen::Dynamic || Derived::RowsAtCompileTime == rows) &&
                           (Derived::ColsAtCompileTime == Eigen::Dynamic || Derived::ColsAtCompileTime == cols);
    if (resizable)
      m.resize(rows, cols);
    else
      bad = 1;
  }
  int any_bad = 0;
  detail::check(MPI_Allreduce(&bad, &any_bad, 1, MPI_INT, MPI_MAX, comm), w, "MPI_Allreduce");
  if (any_bad)
    detail::raise<ShapeError>(w, "the root's matrix is ", rows, "x", cols,
                              bad ? ", which this rank's fixed-size matrix cannot take"
                                  : "; another rank's fixed-size matrix cannot take it");
  detail::broadcast_scalars(m.data(), m.size(), root, comm, w);
}

/// \brief DataParallel's options.
struct DataParallelOptions {
  /// The most bytes one allreduce carries. Gradients larger than that go in several calls (buckets),
  /// through one staging buffer of this size allocated at construction. 0: one bucket, whatever the size.
  std::size_t bucket_bytes = std::size_t(32) << 20;
  /// Also broadcast the optimizer's state (moments, step counts, learning rate) from rank 0 at start,
  /// so a run that rank 0 resumed from a checkpoint continues on every rank.
  bool broadcast_optimizer_state = true;
};

/// \brief What the last average_gradients() did.
struct ReduceStats {
  std::int64_t tokens = 0;       ///< the step's tokens (examples) over all ranks
  Index gradient_elements = 0;   ///< gradient scalars reduced: the optimizer's num_parameters()
  std::size_t gradient_bytes = 0;  ///< their bytes
  std::size_t bytes = 0;         ///< bytes allreduced: the gradients plus one scalar, the token count
  int calls = 0;                 ///< MPI_Allreduce calls (buckets)
};

/// \brief Averages an optimizer's gradients across the ranks of a communicator (see the file's
/// description). Holds a reference to the optimizer, which must outlive it and keep its registrations
/// (an add() after construction is refused at the next collective call, on every rank).
template <class Optimizer>
class DataParallel {
 public:
  using Scalar = typename Optimizer::Scalar;

  /// \brief Collective. Duplicates `comm` (peft's messages never mix with the program's), checks that
  /// every rank registered the same parameters (names, shapes, scalar type and optimizer, and the same
  /// options: compared by a hash of their layout), then gives every rank rank 0's parameter values and,
  /// unless told not to, its optimizer state. Allocates the staging buffer, so that average_gradients()
  /// allocates nothing of its own (MPI's allreduce may use buffers of its own).
  /// \throws ConfigError on every rank if a rank's registered parameters differ from rank 0's (the rank
  /// that differs names the first difference) or the options are invalid; StateError if MPI is not
  /// initialized; CommError if MPI fails.
  explicit DataParallel(Optimizer& optimizer, MPI_Comm comm = MPI_COMM_WORLD,
                        const DataParallelOptions& options = DataParallelOptions())
      : opt_(optimizer), options_(options) {
    const detail::Where w = where("DataParallel");
    int initialized = 0, finalized = 0;
    MPI_Initialized(&initialized);
    MPI_Finalized(&finalized);
    if (!initialized || finalized)
      detail::raise<StateError>(w, "MPI is not initialized (build a peft::mpi::Session, or call MPI_Init, first)");
    detail::check(MPI_Comm_dup(comm, &comm_), w, "MPI_Comm_dup");
    MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN);
    try {
      detail::check(MPI_Comm_rank(comm_, &rank_), w, "MPI_Comm_rank");
      detail::check(MPI_Comm_size(comm_, &size_), w, "MPI_Comm_size");
      layout_ = describe_layout();
      params_ = opt_.flat_parameters();
      layout_hash_ = peft::detail::fnv1a(layout_.data(), layout_.size());
      check_layout(w);
      const std::size_t total = static_cast<std::size_t>(opt_.num_parameters()) + 1;
      const std::size_t per_bucket =
          options_.bucket_bytes == 0 ? total : std::max<std::size_t>(1, options_.bucket_bytes / sizeof(Scalar));
      bucket_ = std::min({total, per_bucket, static_cast<std::size_t>(INT_MAX)});
      staging_.resize(bucket_);
      broadcast_values(w);
      if (options_.broadcast_optimizer_state) broadcast_state(w);
    } catch (...) {
      MPI_Comm_free(&comm_);
      throw;
    }
  }

  ~DataParallel() {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized && comm_ != MPI_COMM_NULL) MPI_Comm_free(&comm_);
  }
  DataParallel(const DataParallel&) = delete;
  DataParallel& operator=(const DataParallel&) = delete;

  /// \returns this process's rank in the communicator.
  int rank() const { return rank_; }
  /// \returns the number of ranks.
  int size() const { return size_; }
  /// \returns peft's duplicate of the communicator it was given.
  MPI_Comm comm() const { return comm_; }
  /// \returns the hash of this rank's registered layout (what construction compared across ranks).
  std::uint64_t layout_hash() const { return layout_hash_; }
  /// \returns the layout the hash is taken of: the scalar type, the optimizer and the options, then one
  /// line "name rows cols" per registered block.
  const std::string& layout() const { return layout_; }
  /// \returns what the last average_gradients() reduced.
  const ReduceStats& last_reduce() const { return stats_; }

  /// \brief Collective. Replaces every registered gradient by the average over all ranks' examples:
  /// sum over ranks of local_tokens × gradient, divided once by the sum of local_tokens. Each rank's
  /// gradient must be the mean over its own local_tokens examples (the usual mean loss), so ranks with
  /// more examples weigh more and an uneven last batch averages exactly as one rank would. A rank with
  /// no examples passes 0 (its gradients are ignored, even NaN). One MPI_Allreduce per bucket; the
  /// token count travels in the first bucket. Afterwards every rank holds the same gradients.
  /// \returns the statistics (also last_reduce()).
  /// \throws on every rank, gradients untouched: ConfigError if a rank passed a negative count, or the
  /// counts or their sum reach 2^24 for float (2^53 for double), beyond which the scalar type may not count
  /// exactly, or no rank had an example; StateError if a
  /// rank's optimizer registered parameters after construction. CommError if MPI fails.
  const ReduceStats& average_gradients(std::int64_t local_tokens) {
    const detail::Where w = where("average_gradients");
    // A local problem is not thrown here, where the other ranks would wait in the allreduce: it turns the
    // token count into NaN, which every rank sees after the first bucket and then refuses.
    const bool registrations_changed = opt_.num_parameters() != parameters_;
    const char* local_problem = nullptr;
    if (registrations_changed)
      local_problem = "its optimizer registered parameters after the DataParallel was built";
    else if (local_tokens < 0 || static_cast<double>(local_tokens) >= exact_limit())
      local_problem = "its token count is out of range";
    const std::vector<FlatParameter<Scalar>>& params = params_;  // its value and gradient views stay valid
    const Scalar weight = static_cast<Scalar>(local_tokens);
    const std::size_t total = static_cast<std::size_t>(parameters_) + 1;
    ReduceStats stats;
    Scalar tokens = 0;
    // Walks the flat layout [token count, block 0's gradient, block 1's, ...] bucket by bucket.
    std::size_t block = 0;
    Index within = 0;  // position in params[block]
    std::size_t unpack_block = 0;
    Index unpack_within = 0;
    for (std::size_t start = 0; start < total; start += bucket_) {
      const std::size_t len = std::min(bucket_, total - start);
      std::size_t k = 0;
      if (start == 0) {
        staging_[0] = local_problem != nullptr ? std::numeric_limits<Scalar>::quiet_NaN() : weight;
        k = 1;
      }
      if (local_problem != nullptr || local_tokens == 0) {
        std::fill(staging_.begin() + static_cast<std::ptrdiff_t>(k), staging_.begin() + static_cast<std::ptrdiff_t>(len),
                  Scalar(0));
      } else {
        while (k < len) {  // pack: local_tokens × gradient
          const auto& g = params[block].grad;
          const Index n = std::min<Index>(g.size() - within, static_cast<Index>(len - k));
          Eigen::Map<VectorX<Scalar>>(staging_.data() + k, n) = weight * g.segment(within, n);
          k += static_cast<std::size_t>(n);
          within += n;
          if (within == g.size()) {
            ++block;
            within = 0;
          }
        }
      }
      detail::check(MPI_Allreduce(MPI_IN_PLACE, staging_.data(), static_cast<int>(len), detail::datatype<Scalar>(),
                                  MPI_SUM, comm_),
                    w, "MPI_Allreduce");
      ++stats.calls;
      k = 0;
      if (start == 0) {
        tokens = staging_[0];
        k = 1;
        // A sum below the limit is exact (so are its partial sums); one that reached it may have rounded.
        if (!(tokens >= 1) || static_cast<double>(tokens) >= exact_limit()) {  // NaN included: all ranks agree
          if (local_problem != nullptr && !registrations_changed)
            detail::raise<ConfigError>(w, "this rank (", rank_, ") passed ", local_tokens,
                                       " tokens, expected 0 .. ", limit_text(), " - 1; gradients untouched");
          if (local_problem != nullptr)
            detail::raise<StateError>(w, "this rank (", rank_, ")'s optimizer has ", opt_.num_parameters(),
                                      " parameters in ", opt_.slots().size(), " blocks, ", parameters_, " in ",
                                      blocks_, " when the DataParallel was built; gradients untouched");
          if (std::isnan(tokens))
            detail::raise<StateError>(w, "another rank could not take part (its error names why); gradients untouched");
          if (tokens < 1)
            detail::raise<ConfigError>(w, "no rank had an example this step (the token counts sum to ", tokens,
                                       "); gradients untouched");
          detail::raise<ConfigError>(w, "the ranks' token counts sum to ", limit_text(),
                                     " or more, which the gradients' scalar type may not count exactly; gradients "
                                     "untouched");
        }
      }
      while (k < len) {  // unpack: the sum divided by the step's tokens
        auto g = params[unpack_block].grad;
        const Index n = std::min<Index>(g.size() - unpack_within, static_cast<Index>(len - k));
        g.segment(unpack_within, n) = Eigen::Map<const VectorX<Scalar>>(staging_.data() + k, n) / tokens;
        k += static_cast<std::size_t>(n);
        unpack_within += n;
        if (unpack_within == g.size()) {
          ++unpack_block;
          unpack_within = 0;
        }
      }
    }
    stats.tokens = static_cast<std::int64_t>(tokens);
    stats.gradient_elements = parameters_;
    stats.gradient_bytes = static_cast<std::size_t>(parameters_) * sizeof(Scalar);
    stats.bytes = total * sizeof(Scalar);
    stats_ = stats;
    averaged_at_step_ = opt_.step_count();
    return stats_;
  }

  /// \brief Clips by the global norm of the averaged gradients: the optimizer's clip_grad_norm, which
  /// after average_gradients() computes the same norm and the same factor on every rank (every rank
  /// holds the same gradients). Local, no communication.
  /// \returns the norm before clipping.
  /// \throws StateError if average_gradients() has not run since the optimizer's last step() (a norm of
  /// local gradients would clip each rank differently); as the optimizer's clip_grad_norm otherwise.
  Scalar clip_grad_norm(Scalar max_norm) {
    if (averaged_at_step_ != opt_.step_count())
      detail::raise<StateError>(where("clip_grad_norm"),
                                "the gradients were not averaged since the last step(): call average_gradients() "
                                "first, or each rank clips by its own norm");
    return opt_.clip_grad_norm(max_norm);
  }

  /// \brief Collective. Gives every rank rank 0's parameter values again (and its optimizer state,
  /// unless the options say not to): after rank 0 alone loaded a checkpoint, for example.
  /// \throws StateError on every rank if an optimizer registered parameters after construction;
  /// CommError if MPI fails.
  void broadcast_parameters() {
    const detail::Where w = where("broadcast_parameters");
    check_unchanged(w);
    broadcast_values(w);
    if (options_.broadcast_optimizer_state) broadcast_state(w);
  }

  /// \brief Collective. Checks that every rank holds bit for bit the same parameter values (a hash of
  /// their bits, compared across ranks): they do after construction and each step, unless a rank
  /// changed them alone.
  /// \throws StateError on every rank if they differ; CommError if MPI fails.
  void check_in_sync() {
    const detail::Where w = where("check_in_sync");
    check_unchanged(w);
    std::uint64_t h = peft::detail::fnv1a_basis;
    for (auto& p : opt_.flat_parameters()) h = detail::hash_bits(p.value.data(), p.value.size(), h);
    std::uint64_t both[2] = {h, ~h}, high[2] = {0, 0};  // max of h and of ~h: all equal iff max(~h) == ~min(h)
    detail::check(MPI_Allreduce(both, high, 2, MPI_UINT64_T, MPI_MAX, comm_), w, "MPI_Allreduce");
    if (high[0] != h || high[1] != ~h)
      detail::raise<StateError>(w, "the ranks' parameters differ (a rank changed them alone: a different "
                                   "learning rate, a skipped step, its own initialization after construction)");
  }

 private:
  static detail::Where where(const char* op) { return {"peft::mpi::DataParallel", op}; }

  static double exact_limit() { return std::is_same<Scalar, float>::value ? 16777216.0 : 9007199254740992.0; }
  static std::string limit_text() { return std::is_same<Scalar, float>::value ? "2^24" : "2^53"; }

  std::string describe_layout() {
    std::ostringstream os;
    os << (std::is_same<Scalar, float>::value ? "float" : "double") << ' ' << Optimizer::class_name
       << " bucket_bytes=" << options_.bucket_bytes
       << " broadcast_optimizer_state=" << (options_.broadcast_optimizer_state ? 1 : 0) << '\n';
    for (const OptimizerSlot& s : opt_.slots()) os << s.name << ' ' << s.rows << ' ' << s.cols << '\n';
    parameters_ = opt_.num_parameters();
    blocks_ = opt_.slots().size();
    return os.str();
  }

  static std::vector<std::string> lines(const std::string& text) {
    std::vector<std::string> out;
    std::istringstream is(text);
    for (std::string line; std::getline(is, line);) out.push_back(line);
    return out;
  }

  /// rank 0's layout to every rank; every rank learns whether any rank differs, the differing rank why.
  void check_layout(const detail::Where& w) {
    unsigned long long head[2] = {layout_hash_, static_cast<unsigned long long>(layout_.size())};
    detail::check(MPI_Bcast(head, 2, MPI_UNSIGNED_LONG_LONG, 0, comm_), w, "MPI_Bcast");
    std::string root_layout(static_cast<std::size_t>(head[1]), '\0');
    if (rank_ == 0) root_layout = layout_;
    detail::check(MPI_Bcast(&root_layout[0], static_cast<int>(root_layout.size()), MPI_CHAR, 0, comm_), w,
                  "MPI_Bcast");
    const bool differs = head[0] != layout_hash_ || root_layout != layout_;
    int mine = differs ? size_ - rank_ : 0, worst = 0;  // max over ranks: size - (lowest differing rank)
    detail::check(MPI_Allreduce(&mine, &worst, 1, MPI_INT, MPI_MAX, comm_), w, "MPI_Allreduce");
    if (worst == 0) return;
    const int first = size_ - worst;
    if (!differs)
      detail::raise<ConfigError>(w, "rank ", first,
                                 "'s registered parameters differ from rank 0's (its error names the difference)");
    const std::vector<std::string> here = lines(layout_), there = lines(root_layout);
    std::ostringstream why;
    std::size_t i = 0;
    while (i < here.size() && i < there.size() && here[i] == there[i]) ++i;
    if (i == 0)
      why << "this rank trains '" << here[0] << "', rank 0 '" << there[0] << "' (scalar type, optimizer, options)";
    else if (i < here.size() && i < there.size())
      why << "registered block " << i - 1 << " is '" << here[i] << "' here, '" << there[i]
          << "' on rank 0 (name rows cols)";
    else
      why << "this rank registered " << here.size() - 1 << " blocks, rank 0 " << there.size() - 1;
    char hashes[64];
    std::snprintf(hashes, sizeof hashes, "layout hash %016llx here, %016llx on rank 0",
                  static_cast<unsigned long long>(layout_hash_), head[0]);
    detail::raise<ConfigError>(w, "this rank (", rank_, ")'s registered parameters differ from rank 0's: ", why.str(),
                               "; ", hashes);
  }

  /// Collective: refuses, on every rank, if any rank's optimizer changed its registrations.
  void check_unchanged(const detail::Where& w) {
    int mine = opt_.num_parameters() != parameters_ || opt_.slots().size() != blocks_ ? 1 : 0, any = 0;
    detail::check(MPI_Allreduce(&mine, &any, 1, MPI_INT, MPI_MAX, comm_), w, "MPI_Allreduce");
    if (any)
      detail::raise<StateError>(w, mine ? "this rank's" : "another rank's",
                                " optimizer registered parameters after the DataParallel was built");
  }

  void broadcast_values(const detail::Where& w) {
    std::vector<FlatParameter<Scalar>> params = opt_.flat_parameters();
    std::size_t block = 0, back = 0;
    Index within = 0, back_within = 0;
    const std::size_t total = static_cast<std::size_t>(parameters_);
    for (std::size_t start = 0; start < total; start += bucket_) {
      const std::size_t len = std::min(bucket_, total - start);
      if (rank_ == 0)
        for (std::size_t k = 0; k < len;) {
          const auto& v = params[block].value;
          const Index n = std::min<Index>(v.size() - within, static_cast<Index>(len - k));
          Eigen::Map<VectorX<Scalar>>(staging_.data() + k, n) = v.segment(within, n);
          k += static_cast<std::size_t>(n);
          if ((within += n) == v.size()) ++block, within = 0;
        }
      detail::check(MPI_Bcast(staging_.data(), static_cast<int>(len), detail::datatype<Scalar>(), 0, comm_), w,
                    "MPI_Bcast");
      if (rank_ != 0)
        for (std::size_t k = 0; k < len;) {
          auto v = params[back].value;
          const Index n = std::min<Index>(v.size() - back_within, static_cast<Index>(len - k));
          v.segment(back_within, n) = Eigen::Map<const VectorX<Scalar>>(staging_.data() + k, n);
          k += static_cast<std::size_t>(n);
          if ((back_within += n) == v.size()) ++back, back_within = 0;
        }
    }
  }

  void broadcast_state(const detail::Where& w) {
    auto state = opt_.state_dict();
    std::vector<long long> counts;
    counts.push_back(state.step_count);
    long long lr_bits = 0;
    static_assert(sizeof(lr_bits) == sizeof(state.lr), "peft::mpi: double is 64 bits");
    std::memcpy(&lr_bits, &state.lr, sizeof lr_bits);
    counts.push_back(lr_bits);
    for (const auto& s : state.slots) counts.push_back(s.steps);
    detail::check(MPI_Bcast(counts.data(), static_cast<int>(counts.size()), MPI_LONG_LONG, 0, comm_), w, "MPI_Bcast");
    for (auto& s : state.slots)
      for (auto& buffer : s.buffers) detail::broadcast_scalars(buffer.data(), buffer.size(), 0, comm_, w);
    if (rank_ == 0) return;
    state.step_count = counts[0];
    std::memcpy(&state.lr, &counts[1], sizeof state.lr);
    for (std::size_t i = 0; i < state.slots.size(); ++i) state.slots[i].steps = counts[i + 2];
    opt_.load_state_dict(state);  // the same layout on every rank (checked): it cannot refuse
  }

  Optimizer& opt_;
  DataParallelOptions options_;
  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0;
  int size_ = 1;
  std::string layout_;
  std::uint64_t layout_hash_ = 0;
  Index parameters_ = 0;
  std::size_t blocks_ = 0;
  std::vector<FlatParameter<Scalar>> params_;  // the registered blocks' storage (their slot pointers may go
                                               // stale after an add(), which is refused before use)
  std::size_t bucket_ = 1;
  std::vector<Scalar> staging_;
  ReduceStats stats_;
  std::int64_t averaged_at_step_ = -1;
};

}  // namespace mpi
}  // namespace peft
