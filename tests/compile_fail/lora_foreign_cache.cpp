// Must not compile: a double adapter's cache passed to a float adapter.
#include <peft/peft.hpp>

int main() {
  Eigen::MatrixXf W = Eigen::MatrixXf::Zero(4, 4);
  peft::LoRA<Eigen::MatrixXf> lora(W);
  peft::LoRA<Eigen::MatrixXd>::Cache cache;
  Eigen::MatrixXf X = Eigen::MatrixXf::Zero(4, 2);
  return static_cast<int>(lora.forward(X, cache).size());
}
