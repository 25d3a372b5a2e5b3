// What the exact restore costs (docs/math.md, Exact restore): merge() and unmerge() of the same d x d
// layer with the exact restore on (the default) and off, timed in rotation in one loop:
//
//   BM_ExactRestore   adapter: 0 LoRA, 1 DoRA, 2 SSF, 3 PiSSA, 4 StandaloneSSF (fold_into_next and
//                     unfold_from_next); rank 16 for the low-rank adapters; float (f = 0) or double (f = 1)
//
// Counters: merge_ratio (exact merge / ordinary merge), unmerge_ratio (the same for the unmerge), and
// record_share, the bytes kept while merged over W's bytes. The iteration time is the exact merge's.
// Each iteration runs three cycles of each, in two blocks whose order alternates (see rotate()).
#include "bench_support.hpp"

#include <memory>

namespace {

template <class S>
struct Layer {
  using M = peft::MatrixX<S>;
  M W;
  peft::VectorX<S> b;
  explicit Layer(Eigen::Index d)
      : W(peft::bench::random_matrix(d, d, 1).cast<S>()), b(peft::bench::random_matrix(d, 1, 2).cast<S>()) {}
};

template <class A>
void move_parameters(A& a) {  // as after training: no parameter at its init value
  using S = typename A::Scalar;
  std::uint64_t seed = 10;
  for (auto& p : a.parameters())
    p.value.array() += S(0.1) * peft::bench::random_matrix(p.value.rows(), p.value.cols(), seed++).template cast<S>().array();
}

/// Times, per iteration, three merge/unmerge cycles with the ordinary restore and three with the exact
/// one, which block comes first alternating from iteration to iteration. In blocks, because with the
/// BLAS backend OpenBLAS's threads (the ordinary merge's GEMM) and OpenMP's (the exact restore's tiles)
/// each spin a while after their work and slow whatever runs next on the two cores: a switch at every
/// call would time that contention rather than either restore.
template <class Adapter, class Merge, class Unmerge>
void rotate(benchmark::State& state, Adapter& a, std::size_t weight_bytes, Merge merge, Unmerge unmerge) {
  constexpr int cycles = 3;
  double t[4] = {0, 0, 0, 0};
  double share = 0;
  int iteration = 0;
  for (auto _ : state) {
    double lap[4] = {0, 0, 0, 0};
    const int first = iteration++ % 2;
    for (int k = 0; k < 2; ++k) {
      const int exact = k ^ first;
      a.set_exact_restore(exact == 1);
      for (int c = 0; c < cycles; ++c) {
        const auto t0 = peft::bench::Clock::now();
        merge();
        const auto t1 = peft::bench::Clock::now();
        if (exact) share = double(a.restore_bytes()) / double(weight_bytes);
        unmerge();
        const auto t2 = peft::bench::Clock::now();
        lap[2 * exact] += std::chrono::duration<double>(t1 - t0).count();
        lap[2 * exact + 1] += std::chrono::duration<double>(t2 - t1).count();
      }
    }
    for (int k = 0; k < 4; ++k) t[k] += lap[k];
    state.SetIterationTime(lap[2] / cycles);
  }
  state.counters["merge_ratio"] = t[2] / t[0];
  state.counters["unmerge_ratio"] = t[3] / t[1];
  state.counters["record_share"] = share;
}

template <class S>
void run(benchmark::State& state, int kind, Eigen::Index d) {
  using M = peft::MatrixX<S>;
  Layer<S> l(d);
  const std::size_t bytes = sizeof(S) * std::size_t(l.W.size());
  peft::LoRAConfig lc;
  lc.rank = 16;
  lc.alpha = 32;
  lc.init = peft::LoRAInit::random;
  switch (kind) {
    case 0: {
      peft::LoRA<M> a(l.W, lc);
      rotate(state, a, bytes, [&] { a.merge(); }, [&] { a.unmerge(); });
      break;
    }
    case 1: {
      peft::DoRAConfig dc;
      static_cast<peft::LoRAConfig&>(dc) = lc;
      peft::DoRA<M> a(l.W, l.b, dc);
      move_parameters(a);
      rotate(state, a, bytes, [&] { a.merge(); }, [&] { a.unmerge(); });
      break;
    }
    case 2: {
      peft::SSF<M> a(l.W, l.b);
      move_parameters(a);
      rotate(state, a, bytes, [&] { a.merge(); }, [&] { a.unmerge(); });
      break;
    }
    case 3: {
      peft::PiSSAConfig pc;
      static_cast<peft::LoRAConfig&>(pc) = lc;
      pc.svd_iterations = 2;
      peft::PiSSA<M> a(l.W, pc);
      move_parameters(a);
      rotate(state, a, bytes, [&] { a.merge(); }, [&] { a.unmerge(); });
      break;
    }
    default: {
      peft::StandaloneSSF<S> a(d);
      move_parameters(a);
      rotate(state, a, bytes, [&] { a.fold_into_next(l.W, l.b); }, [&] { a.unfold_from_next(l.W, l.b); });
      break;
    }
  }
}

void BM_ExactRestore(benchmark::State& state) {
  const int kind = int(state.range(0));
  const Eigen::Index d = state.range(1);
  if (state.range(2) == 0)
    run<float>(state, kind, d);
  else
    run<double>(state, kind, d);
}

void Args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"adapter", "d", "f"});
  for (int d : {1024, 4096})
    for (int kind = 0; kind < 5; ++kind)
      for (int f : {0, 1}) b->Args({kind, d, f});
  b->UseManualTime()->Unit(benchmark::kMillisecond);
}

}  // namespace

BENCHMARK(BM_ExactRestore)->Apply(Args);

PEFT_BENCHMARK_MAIN();
