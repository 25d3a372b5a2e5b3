// Must not compile: an expression type (a Map) as MatrixType; the weight is bound by reference anyway.
#include <peft/peft.hpp>

int main() {
  Eigen::MatrixXf W = Eigen::MatrixXf::Zero(4, 4);
  using MapType = Eigen::Map<Eigen::MatrixXf>;
  peft::LoRA<MapType>* lora = nullptr;
  return static_cast<int>(sizeof(*lora)) + static_cast<int>(W.size());
}
