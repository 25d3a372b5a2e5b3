#pragma once
/// \file random.hpp
/// \brief A seeded random engine with our own uniform and normal transforms.
///
/// Results depend only on the seed, never on the platform's standard library (std::normal_distribution
/// is implementation-defined) and never on global state (Eigen's Random() uses std::rand: not
/// reproducible, not thread-safe). One Rng per adapter; it is copied with the adapter, so a copy
/// replays the same dropout masks.

#include "peft/core/types.hpp"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace peft {

/// \brief Seeded random source: `std::mt19937_64` with explicit uniform and normal transforms.
class Rng {
 public:
  explicit Rng(std::uint64_t seed = 0) : engine_(seed) {}

  /// \returns a double uniform in [0, 1), from the top 53 bits of one 64-bit draw.
  double uniform() { return static_cast<double>(engine_() >> 11) * (1.0 / 9007199254740992.0); }

  /// \returns a double uniform in [lo, hi).
  double uniform(double lo, double hi) { return lo + (hi - lo) * uniform(); }

  /// \returns a standard normal double (Box-Muller; the second value of each pair is kept for the
  /// next call).
  double normal() {
    if (has_spare_) {
      has_spare_ = false;
      return spare_;
    }
    double u1 = uniform();
    while (u1 <= 0.0) u1 = uniform();
    const double u2 = uniform();
    const double radius = std::sqrt(-2.0 * std::log(u1));
    const double angle = 6.283185307179586476925286766559 * u2;
    spare_ = radius * std::sin(angle);
    has_spare_ = true;
    return radius * std::cos(angle);
  }

  /// \returns a normal double with the given mean and standard deviation.
  double normal(double mean, double stddev) { return mean + stddev * normal(); }

  /// Fills m (a writable Eigen matrix, map or block) with U(lo, hi), in storage order.
  template <class M>
  void fill_uniform(M&& m, double lo, double hi) {
    fill(m, [&] { return uniform(lo, hi); });
  }

  /// Fills m with N(mean, stddev^2), in storage order.
  template <class M>
  void fill_normal(M&& m, double mean, double stddev) {
    fill(m, [&] { return normal(mean, stddev); });
  }

  /// Direct access to the engine, for std:: distributions a user wants on top.
  std::mt19937_64& engine() { return engine_; }

  /// \returns the complete state as text (the engine's state words, then the normal value kept for the
  /// next call, bit for bit): a checkpoint of the stream, restored by set_state().
  std::string state() const {
    std::ostringstream out;
    out << engine_;
    std::uint64_t bits = 0;
    std::memcpy(&bits, &spare_, sizeof bits);
    out << ' ' << (has_spare_ ? 1 : 0) << ' ' << bits;
    return out.str();
  }

  /// \brief Restores a state written by state(): the stream then continues exactly where that one was.
  /// \throws std::invalid_argument if `text` is not such a state (the stream is unchanged then).
  void set_state(const std::string& text) {
    std::istringstream in(text);
    std::mt19937_64 engine;
    int has_spare = -1;
    std::uint64_t bits = 0;
    in >> engine >> has_spare >> bits;
    if (in.fail() || (has_spare != 0 && has_spare != 1) || !(in >> std::ws).eof())
      throw std::invalid_argument("peft::Rng::set_state: not a state written by Rng::state()");
    engine_ = engine;
    has_spare_ = has_spare == 1;
    std::memcpy(&spare_, &bits, sizeof bits);
  }

 private:
  template <class M, class Draw>
  static void fill(M& m, Draw draw) {
    using S = typename std::decay_t<M>::Scalar;
    constexpr bool row_major = std::decay_t<M>::IsRowMajor;
    for (Index outer = 0; outer < m.outerSize(); ++outer)
      for (Index inner = 0; inner < m.innerSize(); ++inner)
        (row_major ? m.coeffRef(outer, inner) : m.coeffRef(inner, outer)) = static_cast<S>(draw());
  }

  std::mt19937_64 engine_;
  double spare_ = 0.0;
  bool has_spare_ = false;
};

}  // namespace peft
