// ODR test, first translation unit: both units include the whole library and instantiate the same
// templates; the binary links and both give the same answer.
#include "support/catch.hpp"

#include <peft/model/adapter_set.hpp>
#include <peft/peft.hpp>

double odr_unit_b_output();

double odr_unit_a_output() {
  Eigen::MatrixXd W = Eigen::MatrixXd::Identity(3, 3);
  peft::LoRAConfig cfg;
  cfg.rank = 2;
  cfg.init = peft::LoRAInit::random;
  peft::LoRA<Eigen::MatrixXd> lora(W, cfg);
  return lora.forward(Eigen::MatrixXd::Ones(3, 1)).sum();
}

TEST_CASE("two translation units including the library link and agree") {
  REQUIRE(odr_unit_a_output() == odr_unit_b_output());
  REQUIRE(odr_unit_a_output() != 3.0);  // the random init moved the output
}
