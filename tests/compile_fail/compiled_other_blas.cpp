// Must not compile: this translation unit is built without the BLAS backend (-UPEFT_BLAS
// -UEIGEN_USE_BLAS) against a compiled part built with it (tests/compile_fail/CMakeLists.txt).
#include <peft/peft.hpp>

int main() {
  Eigen::MatrixXf W = Eigen::MatrixXf::Zero(4, 3);
  peft::LoRA<Eigen::MatrixXf> lora(W, peft::LoRAConfig{});
  return lora.d_out() == 4 ? 0 : 1;
}
