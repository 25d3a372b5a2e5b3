#pragma once
/// \file merge_state.hpp
/// \brief The merged/unmerged state machine, written once for every adapter (merge into W) and for
/// the standalone SSF (fold into a neighbouring layer).

#include "peft/detail/internal_header_check.hpp"

#include "peft/core/error.hpp"
#include "peft/core/types.hpp"

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <utility>

namespace peft {
namespace detail {

/// \brief Whether the owner's delta currently lives in someone else's weights, the parameters it was
/// merged with (so the reverse operation takes out exactly what went in), and a state counter that
/// caches record so they go stale on merge, unmerge and assignment.
///
/// Copying or assigning a merged state throws StateError (two owners would each believe they could
/// take the one delta out), and so does assigning over one (its delta could never be taken out).
/// Moving transfers it; the moved-from state is unmerged. Make it the owner's *first* base class, so
/// a refused assignment throws before any other part of the owner is touched.
/// \tparam Owner provides `class_name`, `applied_state` ("merged", "folded") and `undo_call`
///         ("unmerge()"), for messages
template <class Owner, class Scalar>
class MergeState {
 public:
  /// The state counter starts from the clock, so that an object built where another one was destroyed
  /// (same address, same shapes) never accepts the caches that one filled.
  MergeState() : state_(fresh_state()) {}

  MergeState(const MergeState& other) : snapshot_(other.snapshot_), state_(other.state_) {
    if (other.merged_)
      raise<StateError>(Where{Owner::class_name, "copy"}, "copying a ", Owner::applied_state, " adapter; call ",
                        Owner::undo_call, " first (both copies would believe they own the delta written into the "
                        "weights)");
  }

  MergeState(MergeState&& other) noexcept
      : snapshot_(std::move(other.snapshot_)), merged_(other.merged_), state_(other.state_) {
    other.merged_ = false;
  }

  MergeState& operator=(const MergeState& other) {
    if (this == &other) return *this;
    check_assignable();
    if (other.merged_)
      raise<StateError>(Where{Owner::class_name, "assign"}, "copying a ", Owner::applied_state, " adapter; call ",
                        Owner::undo_call, " first");
    snapshot_ = other.snapshot_;
    state_ = std::max(state_, other.state_) + 1;  // caches of this owner's former self go stale
    return *this;
  }

  MergeState& operator=(MergeState&& other) {
    if (this == &other) return *this;
    check_assignable();
    snapshot_ = std::move(other.snapshot_);
    merged_ = other.merged_;
    other.merged_ = false;
    state_ = std::max(state_, other.state_) + 1;
    return *this;
  }

  ~MergeState() = default;

  /// \returns whether merged.
  bool merged() const { return merged_; }
  /// \returns the counter caches record.
  std::uint64_t state() const { return state_; }
  /// \returns the parameters at merge time (only while merged).
  const VectorX<Scalar>& snapshot() const { return snapshot_; }

  /// Throws StateError unless the state is `want_merged`.
  void require(bool want_merged, const char* op) const {
    if (merged_ && !want_merged)
      raise<StateError>(Where{Owner::class_name, op}, "already ", Owner::applied_state, "; call ", Owner::undo_call,
                        " first");
    if (!merged_ && want_merged) raise<StateError>(Where{Owner::class_name, op}, "not ", Owner::applied_state);
  }

  /// Records a completed merge with the parameters it used (moved in).
  void set_merged(VectorX<Scalar>&& parameters) noexcept {
    snapshot_.swap(parameters);
    merged_ = true;
    ++state_;
  }

  /// Records a completed unmerge.
  void set_unmerged() noexcept {
    snapshot_.resize(0);
    merged_ = false;
    ++state_;
  }

 private:
  static std::uint64_t fresh_state() {
    const auto ticks = static_cast<std::uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count());
    return (ticks * 0x9E3779B97F4A7C15ull) >> 8;  // spread, with room below 2^64 for the increments
  }

  void check_assignable() const {
    if (merged_)
      raise<StateError>(Where{Owner::class_name, "assign"}, "assigning over a ", Owner::applied_state,
                        " adapter would lose what it wrote into the weights; call ", Owner::undo_call, " first");
  }

  VectorX<Scalar> snapshot_;
  bool merged_ = false;
  std::uint64_t state_ = 0;
};

}  // namespace detail
}  // namespace peft
