// peft::WarmupCosine: warm-up, the cosine, the floor, Hugging Face's conventions; config errors.
#include "support/catch.hpp"
#include "support/errors.hpp"

#include <peft/optim/schedule.hpp>

#include <cmath>

using peft::test::has_substring;
using peft::test::message_of;

TEST_CASE("WarmupCosine: linear warm-up from 0, cosine to the floor, then the floor", "[schedule]") {
  const peft::WarmupCosine s(1e-3, 10, 110, 1e-4);
  REQUIRE(s(0) == 0.0);
  REQUIRE(s(-3) == 0.0);
  REQUIRE_THAT(s(5), WithinAbs(0.5e-3, 1e-18));
  REQUIRE_THAT(s(10), WithinAbs(1e-3, 1e-18));
  REQUIRE_THAT(s(60), WithinAbs(1e-4 + 0.9e-3 * 0.5, 1e-18));  // half way: cos(pi / 2) = 0
  REQUIRE_THAT(s(35), WithinAbs(1e-4 + 0.9e-3 * 0.5 * (1.0 + std::cos(3.14159265358979323846 / 4.0)), 1e-18));
  REQUIRE_THAT(s(110), WithinAbs(1e-4, 1e-18));
  REQUIRE_THAT(s(1000), WithinAbs(1e-4, 1e-18));
  for (std::int64_t t = 10; t < 110; ++t) REQUIRE(s(t + 1) <= s(t));  // monotone after warm-up
}

TEST_CASE("WarmupCosine without warm-up starts at the peak", "[schedule]") {
  const peft::WarmupCosine s(0.1, 0, 4);
  REQUIRE(s(0) == 0.1);
  REQUIRE_THAT(s(2), WithinAbs(0.05, 1e-16));
  REQUIRE(s(4) == 0.0);
}

TEST_CASE("WarmupCosine: invalid schedules are refused", "[schedule][errors]") {
  REQUIRE_THROWS_AS(peft::WarmupCosine(-1.0, 0, 10), peft::ConfigError);
  REQUIRE_THAT(message_of([] { peft::WarmupCosine(1.0, 0, 10, 2.0); }),
               has_substring("peft::WarmupCosine::constructor: min_lr is 2"));
  REQUIRE_THAT(message_of([] { peft::WarmupCosine(1.0, -1, 10); }), has_substring("warmup_steps is -1"));
  REQUIRE_THAT(message_of([] { peft::WarmupCosine(1.0, 10, 10); }), has_substring("total_steps is 10"));
}
