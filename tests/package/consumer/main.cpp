// A tiny consumer of the library: wraps a weight with LoRA, trains nothing, checks three identities.
// Exits non-zero when one fails, so the packaging tests prove the headers work, not just compile.
#include <peft/peft.hpp>

#include <cstdio>

int main() {
  Eigen::MatrixXd W = Eigen::MatrixXd::Identity(6, 5);
  Eigen::VectorXd b = Eigen::VectorXd::Constant(6, 0.5);
  peft::LoRAConfig cfg;
  cfg.rank = 2;
  cfg.init = peft::LoRAInit::random;
  peft::LoRA<Eigen::MatrixXd> lora(W, b, cfg);
  const Eigen::MatrixXd X = Eigen::MatrixXd::Ones(5, 3);
  const Eigen::MatrixXd Y = lora.forward(X);
  const Eigen::MatrixXd expected = (W + lora.delta_weight()) * X + b.replicate(1, 3);
  lora.merge();
  const Eigen::MatrixXd Ym = lora.forward(X);
  lora.unmerge();
  const bool ok = (Y - expected).cwiseAbs().maxCoeff() < 1e-12 && (Ym - Y).cwiseAbs().maxCoeff() < 1e-12 &&
                  (W - Eigen::MatrixXd::Identity(6, 5)).cwiseAbs().maxCoeff() < 1e-15;
#ifdef PEFT_COMPILED
  const char* how = "with the compiled part";
#else
  const char* how = "header-only";
#endif
  std::printf("peft %s consumer (%s): %s\n", peft::version_string, how, ok ? "ok" : "FAILED");
  return ok ? 0 : 1;
}
