#pragma once
// Sets the thread count of every product for a scope (peft::set_num_threads: Eigen's, and OpenBLAS's
// with the BLAS backend), and restores it.
#include <peft/core/threads.hpp>

namespace peft::test {

class EigenThreads {
 public:
  explicit EigenThreads(int n) : saved_(peft::num_threads()) { peft::set_num_threads(n); }
  ~EigenThreads() { peft::set_num_threads(saved_); }
  EigenThreads(const EigenThreads&) = delete;
  EigenThreads& operator=(const EigenThreads&) = delete;

 private:
  int saved_;
};

}  // namespace peft::test
