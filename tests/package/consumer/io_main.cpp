// A tiny consumer of peft::io: writes a safetensors file, reads it back through the installed headers
// and merges a LoRA update with the Eigen-only merge header. Exits non-zero when a check fails.
#include <peft/io/merge.hpp>
#include <peft/io/safetensors.hpp>

#include <cstdio>
#include <string>

int main() {
  const std::string path = "consumer_io.safetensors";
  const Eigen::MatrixXf W = Eigen::MatrixXf::Identity(4, 3);
  peft::io::save_safetensors<float>(path, {{"w", W}}, peft::io::Dtype::BF16);
  const peft::io::SafetensorsFile f(path);
  Eigen::MatrixXf R = f.view().read<float>("w");
  const bool read_ok = R == W && f.view().tensors().at(0).dtype == peft::io::Dtype::BF16;
  peft::merge::lora(R, Eigen::MatrixXf::Ones(1, 3), Eigen::MatrixXf::Ones(4, 1), 0.5);
  const bool merge_ok = (R - (W + 0.5f * Eigen::MatrixXf::Ones(4, 3))).cwiseAbs().maxCoeff() == 0.0f;
  std::remove(path.c_str());
  std::printf("peft::io consumer: %s\n", read_ok && merge_ok ? "ok" : "FAILED");
  return read_ok && merge_ok ? 0 : 1;
}
