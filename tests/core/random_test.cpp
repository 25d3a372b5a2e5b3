// The random streams: the seeded Rng (reproducible, the right moments, storage-order-independent
// fills), its state saved as text and restored exactly (the cached normal included) or refused; and the
// LoRA family's dropout stream, whose state replays the masks.
#include "support/catch.hpp"
#include "support/errors.hpp"
#include "support/matrices.hpp"

#include <peft/adapters/lora.hpp>
#include <peft/core/random.hpp>

#include <Eigen/Core>

#include <cmath>
#include <cstddef>
#include <stdexcept>
#include <string>
#include <vector>

using peft::test::has_substring;
using peft::test::MatrixXf;
using peft::test::message_of;
using peft::test::random_matrix;

TEST_CASE("Rng is reproducible from its seed and copies replay the stream") {
  peft::Rng a(123), b(123), c(124);
  for (int i = 0; i < 10; ++i) {
    const double x = a.uniform();
    REQUIRE(x == b.uniform());
    REQUIRE(x >= 0.0);
    REQUIRE(x < 1.0);
  }
  REQUIRE(a.uniform() != c.uniform());
  peft::Rng copy = a;
  REQUIRE(copy.normal() == a.normal());
  REQUIRE(copy.normal() == a.normal());  // the spare of the Box-Muller pair is copied too
}

TEST_CASE("Rng uniform and normal have the documented moments") {
  peft::Rng rng(5);
  const int n = 200000;
  double su = 0, su2 = 0, sn = 0, sn2 = 0, sn4 = 0;
  for (int i = 0; i < n; ++i) {
    const double u = rng.uniform(-2.0, 4.0);
    su += u;
    su2 += u * u;
    const double z = rng.normal(1.0, 0.5);
    sn += z;
    sn2 += (z - 1.0) * (z - 1.0);
    sn4 += std::pow(z - 1.0, 4);
  }
  REQUIRE_THAT(su / n, WithinAbs(1.0, 0.02));                  // mean of U(-2, 4)
  REQUIRE_THAT(su2 / n - (su / n) * (su / n), WithinRel(3.0, 0.02));  // variance 36 / 12
  REQUIRE_THAT(sn / n, WithinAbs(1.0, 0.005));
  REQUIRE_THAT(sn2 / n, WithinRel(0.25, 0.02));
  REQUIRE_THAT(sn4 / n / (0.25 * 0.25), WithinRel(3.0, 0.05));  // normal kurtosis
}

TEST_CASE("Rng fills matrices in storage order, through maps and blocks") {
  Eigen::MatrixXd col(3, 4);
  Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> row(3, 4);
  peft::Rng(9).fill_uniform(col, -1, 1);
  peft::Rng(9).fill_uniform(row, -1, 1);
  // Same stream, storage order: row-major's first row holds the column-major's first column's draws.
  REQUIRE(row(0, 0) == col(0, 0));
  REQUIRE(row(0, 1) == col(1, 0));
  Eigen::MatrixXd big = Eigen::MatrixXd::Zero(5, 5);
  peft::Rng rng(1);
  rng.fill_normal(big.block(1, 1, 2, 2), 0.0, 1.0);
  REQUIRE(big.row(0).isZero(0));
  REQUIRE(big(1, 1) != 0.0);
  REQUIRE(big(3, 3) == 0.0);
}

// ===================================================================================================
// Random states: Rng and the LoRA family's dropout stream

TEST_CASE("Rng state and set_state continue the stream exactly including the cached normal", "[random]") {
  const auto draw = [](peft::Rng& r) {
    std::vector<double> out;
    out.push_back(r.normal());  // the spare of the pair drawn before the state was saved
    out.push_back(r.normal());
    out.push_back(r.uniform());
    out.push_back(r.normal());
    out.push_back(static_cast<double>(r.engine()()));
    return out;
  };
  peft::Rng rng(2024);
  rng.uniform();
  rng.normal();  // a normal pair: its second value is now cached
  const std::string saved = rng.state();
  const std::vector<double> first = draw(rng);
  REQUIRE((rng.state() != saved));
  rng.set_state(saved);
  REQUIRE((rng.state() == saved));
  REQUIRE((draw(rng) == first));
  // Another Rng restored from the text continues the same stream, the cached normal included.
  peft::Rng other(7);
  other.set_state(saved);
  REQUIRE((draw(other) == first));
  // A state without a cached normal drops the one the receiver holds.
  peft::Rng fresh(3);
  const std::string no_spare = fresh.state();
  const double next = fresh.normal();
  peft::Rng holder(4);
  holder.normal();
  holder.set_state(no_spare);
  REQUIRE((holder.normal() == next));
}

TEST_CASE("Rng set_state refuses text that is not a state and keeps its stream", "[random][errors]") {
  peft::Rng rng(11);
  rng.normal();
  const std::string saved = rng.state();
  const std::size_t last = saved.rfind(' ');
  const std::size_t flag = saved.rfind(' ', last - 1);
  const std::string bad_flag = saved.substr(0, flag + 1) + "2" + saved.substr(last);
  const std::vector<std::string> invalid = {"", "hello", saved.substr(0, saved.size() / 2), saved + " 9", bad_flag,
                                            saved.substr(0, flag)};
  for (const std::string& text : invalid) {
    INFO("state text of " << text.size() << " characters");
    peft::Rng copy = rng;
    REQUIRE_THROWS_AS(rng.set_state(text), std::invalid_argument);
    REQUIRE((rng.state() == saved));
    REQUIRE((rng.normal() == copy.normal()));
    rng.set_state(saved);
  }
}

TEST_CASE("LoRA random_state and set_random_state replay the dropout masks", "[random][lora]") {
  MatrixXf W = random_matrix<MatrixXf>(6, 5, 61), W2 = W;
  peft::LoRAConfig cfg;
  cfg.rank = 2;
  cfg.dropout = 0.5;
  cfg.init = peft::LoRAInit::random;
  cfg.seed = 17;
  peft::LoRA<MatrixXf> lora(W, cfg);
  const MatrixXf X = random_matrix<MatrixXf>(5, 8, 62);
  const std::string start = lora.random_state();
  peft::LoRA<MatrixXf>::Cache cache;
  const MatrixXf Y1 = lora.forward(X, cache);
  const MatrixXf mask1 = cache.branch.mask;
  const MatrixXf Y2 = lora.forward(X, cache);
  REQUIRE((Y1 != Y2));  // two different masks
  lora.set_random_state(start);
  REQUIRE((lora.forward(X, cache) == Y1));
  REQUIRE((cache.branch.mask == mask1));
  REQUIRE((lora.forward(X, cache) == Y2));

  // Another adapter with the same parameters but another seed draws the same masks from the state.
  cfg.seed = 99;
  peft::LoRA<MatrixXf> other(W2, cfg);
  other.flat_values() = lora.flat_values();
  peft::LoRA<MatrixXf>::Cache other_cache;
  other.set_random_state(start);
  REQUIRE((other.forward(X, other_cache) == Y1));
  REQUIRE((other.forward(X, other_cache) == Y2));
  REQUIRE((other.random_state() == lora.random_state()));

  // Not a state: ConfigError, the stream unchanged.
  const std::string before = lora.random_state();
  REQUIRE_THROWS_AS(lora.set_random_state("0 1"), peft::ConfigError);
  REQUIRE_THAT(message_of([&] { lora.set_random_state("0 1"); }),
               has_substring("peft::LoRA::set_random_state: not a state written by random_state()"));
  REQUIRE((lora.random_state() == before));
  REQUIRE((lora.forward(X, cache) == other.forward(X, other_cache)));
}
