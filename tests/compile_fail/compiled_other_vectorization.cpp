// Must not compile: this translation unit is built with -mavx (Eigen's largest alignment 32 bytes)
// against a compiled part built with 16 (tests/compile_fail/CMakeLists.txt).
#include <peft/peft.hpp>

int main() {
  Eigen::MatrixXf W = Eigen::MatrixXf::Zero(4, 3);
  peft::LoRA<Eigen::MatrixXf> lora(W, peft::LoRAConfig{});
  return lora.d_out() == 4 ? 0 : 1;
}
