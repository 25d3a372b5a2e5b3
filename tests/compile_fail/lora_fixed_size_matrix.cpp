// Must not compile: a fixed-size weight.
#include <peft/peft.hpp>

int main() {
  Eigen::Matrix4f W = Eigen::Matrix4f::Zero();
  peft::LoRA<Eigen::Matrix4f> lora(W);
  return static_cast<int>(lora.d_out());
}
