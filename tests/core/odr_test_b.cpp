// ODR test, second translation unit (see odr_test_a.cpp).
#include <peft/model/adapter_set.hpp>
#include <peft/peft.hpp>

double odr_unit_b_output() {
  Eigen::MatrixXd W = Eigen::MatrixXd::Identity(3, 3);
  peft::LoRAConfig cfg;
  cfg.rank = 2;
  cfg.init = peft::LoRAInit::random;
  peft::LoRA<Eigen::MatrixXd> lora(W, cfg);
  return lora.forward(Eigen::MatrixXd::Ones(3, 1)).sum();
}
