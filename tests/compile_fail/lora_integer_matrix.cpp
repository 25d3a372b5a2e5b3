// Must not compile: an integer weight.
#include <peft/peft.hpp>

int main() {
  Eigen::MatrixXi W = Eigen::MatrixXi::Zero(4, 4);
  peft::LoRA<Eigen::MatrixXi> lora(W);
  return static_cast<int>(lora.d_out());
}
