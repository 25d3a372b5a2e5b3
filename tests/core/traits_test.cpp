// peft::is_adapter_v accepts the adapters and rejects what is not one.
#include "support/catch.hpp"

#include <peft/peft.hpp>

#include <Eigen/Core>

TEST_CASE("is_adapter_v recognises adapters and rejects other types") {
  using RowMajorXf = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  static_assert(peft::is_adapter_v<peft::LoRA<Eigen::MatrixXf>>, "LoRA<MatrixXf> is an adapter");
  static_assert(peft::is_adapter_v<const peft::LoRA<RowMajorXf>&>, "cv-ref of an adapter is an adapter");
  static_assert(!peft::is_adapter_v<Eigen::MatrixXf>, "a matrix is not an adapter");
  static_assert(!peft::is_adapter_v<int>, "int is not an adapter");
  REQUIRE(peft::is_adapter_v<peft::LoRA<Eigen::MatrixXd>>);
  REQUIRE(peft::is_adapter_v<peft::SSF<RowMajorXf>>);
  // The standalone SSF trains but has nothing to merge into: trainable, not an adapter.
  REQUIRE(peft::is_trainable_v<peft::StandaloneSSF<float>>);
  REQUIRE_FALSE(peft::is_adapter_v<peft::StandaloneSSF<float>>);
  REQUIRE(peft::is_trainable_v<peft::LoRA<Eigen::MatrixXf>>);
  REQUIRE_FALSE(peft::is_trainable_v<Eigen::MatrixXf>);
  REQUIRE_FALSE(peft::is_adapter_v<peft::LoRAConfig>);
}

TEST_CASE("the version header agrees with itself") {
  REQUIRE(PEFT_VERSION == PEFT_VERSION_MAJOR * 10000 + PEFT_VERSION_MINOR * 100 + PEFT_VERSION_PATCH);
  const std::string expected = std::to_string(PEFT_VERSION_MAJOR) + "." + std::to_string(PEFT_VERSION_MINOR) +
                               "." + std::to_string(PEFT_VERSION_PATCH);
  REQUIRE(expected == peft::version_string);
}
