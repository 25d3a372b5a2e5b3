// A tiny consumer of peft::mpi, run on one rank: registers a LoRA, builds a DataParallel over it and
// averages its gradients once (on one rank, the average of one). Exits non-zero when a check fails.
#include <peft/adapters/lora.hpp>
#include <peft/distributed/mpi.hpp>
#include <peft/optim/sgd.hpp>

#include <cstdio>

int main(int argc, char** argv) {
  peft::mpi::Session mpi(argc, argv);
  Eigen::MatrixXf W = Eigen::MatrixXf::Identity(4, 3);
  peft::LoRAConfig cfg;
  cfg.rank = 2;
  peft::LoRA<Eigen::MatrixXf> lora(W, cfg);
  peft::SGD<float> opt;
  opt.add(lora);
  peft::mpi::DataParallel<peft::SGD<float>> dp(opt);
  lora.flat_grads().setConstant(0.75f);
  const peft::mpi::ReduceStats& r = dp.average_gradients(3);
  const bool ok = mpi.size() == 1 && (lora.flat_grads().array() == 0.75f).all() && r.tokens == 3 &&
                  r.bytes == (std::size_t(opt.num_parameters()) + 1) * sizeof(float) && r.calls == 1;
  std::printf("peft::mpi consumer: %s\n", ok ? "ok" : "FAILED");
  return ok ? 0 : 1;
}
