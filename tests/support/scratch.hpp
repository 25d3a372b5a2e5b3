#pragma once
// What the file-format tests share: a scratch directory removed at the end, and a reproducible uniform
// random matrix.
#include <Eigen/Core>

#include <algorithm>
#include <filesystem>
#include <random>
#include <string>
#include <system_error>
#include <vector>

#include <unistd.h>

namespace peft {
namespace test {

/// \brief The directory `<temp>/<prefix>_<pid>_<name>`, created empty, removed with its contents at the end.
struct Scratch {
  std::filesystem::path dir;
  Scratch(const std::string& prefix, const std::string& name)
      : dir(std::filesystem::temp_directory_path() / (prefix + "_" + std::to_string(::getpid()) + "_" + name)) {
    std::filesystem::remove_all(dir);
    std::filesystem::create_directories(dir);
  }
  /// \brief `<temp>/peft_test_<pid>_<name>`: a name used once in the process is enough.
  explicit Scratch(const std::string& name) : Scratch("peft_test", name) {}
  /// \brief `<temp>/peft_test_<pid>_dir<n>`, n counting the directories made so in the process.
  Scratch() : Scratch("dir" + std::to_string(++made())) {}
  ~Scratch() {
    std::error_code ec;
    std::filesystem::remove_all(dir, ec);
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  /// \returns the path of `f` in the directory.
  std::string operator/(const std::string& f) const { return (dir / f).string(); }
  /// \returns the names of the directory's entries, sorted (to show what an operation left behind).
  std::vector<std::string> entries() const {
    std::vector<std::string> out;
    for (const auto& e : std::filesystem::directory_iterator(dir)) out.push_back(e.path().filename().string());
    std::sort(out.begin(), out.end());
    return out;
  }

 private:
  static int& made() {
    static int count = 0;
    return count;
  }
};

/// \returns a rows x cols matrix of values uniform in [-scale, scale) from std::mt19937(seed), column by column.
inline Eigen::MatrixXd uniform_matrix(Eigen::Index rows, Eigen::Index cols, unsigned seed, double scale = 1.0) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<double> u(-scale, scale);
  Eigen::MatrixXd m(rows, cols);
  for (Eigen::Index j = 0; j < cols; ++j)
    for (Eigen::Index i = 0; i < rows; ++i) m(i, j) = u(gen);
  return m;
}

}  // namespace test
}  // namespace peft
