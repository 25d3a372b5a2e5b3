#pragma once
// Sets Eigen's thread count for a scope (Eigen::setNbThreads), and restores it.
#include <Eigen/Core>

namespace peft::test {

class EigenThreads {
 public:
  explicit EigenThreads(int n) : saved_(Eigen::nbThreads()) { Eigen::setNbThreads(n); }
  ~EigenThreads() { Eigen::setNbThreads(saved_); }
  EigenThreads(const EigenThreads&) = delete;
  EigenThreads& operator=(const EigenThreads&) = delete;

 private:
  int saved_;
};

}  // namespace peft::test
