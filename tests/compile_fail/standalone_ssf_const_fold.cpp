// Must not compile: folding writes W1, so a const W1 is refused.
#include <peft/peft.hpp>

int main() {
  const Eigen::MatrixXf W1 = Eigen::MatrixXf::Ones(3, 4);
  Eigen::VectorXf b1 = Eigen::VectorXf::Zero(3);
  peft::StandaloneSSF<float> ssf(4);
  ssf.fold_into_next(W1, b1);
  return 0;
}
