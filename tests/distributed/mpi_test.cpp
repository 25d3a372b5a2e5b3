// peft::mpi::DataParallel, run under mpirun with 2 and 3 ranks (tests/distributed/CMakeLists.txt).
//
// Every test case is collective: each rank runs the same cases in the same order. The expected values
// are computed on each rank without MPI (each rank can draw every rank's gradients from their seeds),
// and the cross-rank comparisons use raw MPI calls of the test's own, not the code under test.
#if defined(PEFT_CATCH2_MAJOR) && PEFT_CATCH2_MAJOR >= 3
#include <catch2/catch_all.hpp>
#include <catch2/catch_session.hpp>
#else
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>
#endif

#include <peft/adapters/dora.hpp>
#include <peft/adapters/lora.hpp>
#include <peft/core/random.hpp>
#include <peft/distributed/mpi.hpp>
#include <peft/optim/adamw.hpp>
#include <peft/optim/sgd.hpp>

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

namespace {

using peft::Index;
using Catch::Matchers::Contains;

int world_rank() {
  int r = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}
int world_size() {
  int s = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &s);
  return s;
}

// The same value on every rank? (min == max over the ranks, by the test's own allreduce.)
bool same_everywhere(double x) {
  double lo = 0, hi = 0;
  MPI_Allreduce(&x, &lo, 1, MPI_DOUBLE, MPI_MIN, MPI_COMM_WORLD);
  MPI_Allreduce(&x, &hi, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  return lo == hi;
}

// Every rank's bytes equal rank 0's?
bool same_bytes_everywhere(const void* data, std::size_t n) {
  std::vector<char> root(static_cast<const char*>(data), static_cast<const char*>(data) + n);
  MPI_Bcast(root.data(), static_cast<int>(n), MPI_CHAR, 0, MPI_COMM_WORLD);
  int differ = std::memcmp(root.data(), data, n) != 0 ? 1 : 0, any = 0;
  MPI_Allreduce(&differ, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  return any == 0;
}

// A small model to register: a LoRA and a DoRA layer and a plain head, with rank-dependent values.
template <class Scalar>
struct Model {
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;
  Matrix W1, W2, head, head_grad;
  peft::LoRA<Matrix> lora;
  peft::DoRA<Matrix> dora;

  static peft::DoRAConfig config(Index rank, std::uint64_t seed) {
    peft::DoRAConfig c;
    c.rank = rank;
    c.alpha = 2.0 * double(rank);
    c.init = peft::LoRAInit::random;
    c.seed = seed;
    return c;
  }
  Model(std::uint64_t seed, Index lora_rank = 4)
      : W1(Matrix::Constant(12, 10, Scalar(0.25))),
        W2(Matrix::Constant(9, 12, Scalar(-0.5))),
        head(Matrix::Zero(3, 9)),
        head_grad(Matrix::Zero(3, 9)),
        lora(W1, config(lora_rank, seed)),
        dora(W2, config(3, seed + 1)) {
    peft::Rng rng(seed + 2);
    rng.fill_uniform(head, -1, 1);
  }
  template <class Optimizer>
  void add_to(Optimizer& opt) {
    opt.add(lora, peft::ParamOptions{1.0, true, 1.0, "fc1"});
    opt.add(dora, peft::ParamOptions{1.0, true, 1.0, "fc2"});
    opt.add("head", head, head_grad);
  }
};

// The gradients rank r "computed": uniform in [-1, 1) from a seed of (r, step).
template <class Optimizer>
void fill_gradients(Optimizer& opt, int rank, int step) {
  peft::Rng rng(std::uint64_t(1000 + 97 * rank + step));
  for (auto& p : opt.flat_parameters()) rng.fill_uniform(p.grad, -1, 1);
}

template <class Scalar>
std::vector<Scalar> flat_grads(peft::AdamW<Scalar>& opt) {
  std::vector<Scalar> out;
  for (auto& p : opt.flat_parameters()) out.insert(out.end(), p.grad.data(), p.grad.data() + p.grad.size());
  return out;
}
template <class Scalar>
std::vector<Scalar> flat_values(peft::AdamW<Scalar>& opt) {
  std::vector<Scalar> out;
  for (auto& p : opt.flat_parameters()) out.insert(out.end(), p.value.data(), p.value.data() + p.value.size());
  return out;
}

}  // namespace

TEST_CASE("construction gives every rank rank 0's parameters and optimizer state") {
  const int rank = world_rank();
  Model<float> model(std::uint64_t(10 + rank));  // every rank starts elsewhere
  peft::AdamW<float> opt;
  model.add_to(opt);
  if (rank == 0) {  // rank 0 alone has trained two steps (as if it resumed a checkpoint)
    for (int step = 0; step < 2; ++step) {
      fill_gradients(opt, 0, step);
      opt.set_lr(1e-3 * (step + 1));
      opt.step();
    }
  }
  const std::vector<float> before = flat_values(opt);
  REQUIRE_FALSE(same_bytes_everywhere(before.data(), before.size() * sizeof(float)));

  peft::mpi::DataParallel<peft::AdamW<float>> dp(opt);
  REQUIRE(dp.rank() == rank);
  REQUIRE(dp.size() == world_size());
  const std::vector<float> after = flat_values(opt);
  CHECK(same_bytes_everywhere(after.data(), after.size() * sizeof(float)));
  if (rank == 0) CHECK(after == before);  // the root's own values are untouched
  const auto state = opt.state_dict();
  CHECK(same_everywhere(double(state.step_count)));
  CHECK(state.step_count == 2);
  CHECK(same_everywhere(state.lr));
  for (const auto& slot : state.slots) {
    CHECK(same_everywhere(double(slot.steps)));
    for (const auto& buffer : slot.buffers) CHECK(same_bytes_everywhere(buffer.data(), sizeof(float) * buffer.size()));
  }
  CHECK_NOTHROW(dp.check_in_sync());

  // Without the optimizer state: the values only.
  Model<float> other(std::uint64_t(50 + rank));
  peft::AdamW<float> opt2;
  other.add_to(opt2);
  if (rank == 0) {
    fill_gradients(opt2, 0, 0);
    opt2.step();
  }
  peft::mpi::DataParallelOptions no_state;
  no_state.broadcast_optimizer_state = false;
  peft::mpi::DataParallel<peft::AdamW<float>> dp2(opt2, MPI_COMM_WORLD, no_state);
  const std::vector<float> values = flat_values(opt2);
  CHECK(same_bytes_everywhere(values.data(), values.size() * sizeof(float)));
  CHECK(opt2.step_count() == (rank == 0 ? 1 : 0));
}

TEMPLATE_TEST_CASE("average_gradients weights each rank by its tokens, in one allreduce", "", float, double) {
  using Scalar = TestType;
  const int rank = world_rank(), size = world_size();
  Model<Scalar> model(7);
  peft::AdamW<Scalar> opt;
  model.add_to(opt);
  peft::mpi::DataParallel<peft::AdamW<Scalar>> dp(opt);
  const Index P = opt.num_parameters();

  // Rank r processed tokens(r) examples: uneven, and rank 1 none (its gradients must not count, even NaN).
  const auto tokens = [](int r) { return r == 1 ? 0 : 3 + 2 * r; };
  // The expected average, in double, from every rank's gradients (each rank can draw them all).
  std::vector<double> expected(static_cast<std::size_t>(P), 0.0);
  double total = 0;
  for (int r = 0; r < size; ++r) {
    fill_gradients(opt, r, 5);
    const std::vector<Scalar> g = flat_grads(opt);
    for (std::size_t i = 0; i < g.size(); ++i) expected[i] += double(tokens(r)) * double(g[i]);
    total += tokens(r);
  }
  for (double& e : expected) e /= total;

  fill_gradients(opt, rank, 5);
  if (rank == 1)
    for (auto& p : opt.flat_parameters()) p.grad.setConstant(std::numeric_limits<Scalar>::quiet_NaN());
  const peft::mpi::ReduceStats stats = dp.average_gradients(tokens(rank));
  const std::vector<Scalar> got = flat_grads(opt);
  double worst = 0;
  for (std::size_t i = 0; i < got.size(); ++i) worst = std::max(worst, std::abs(double(got[i]) - expected[i]));
  // Each element: a sum of `size` products and one division, in Scalar.
  CHECK(worst <= 4.0 * (size + 2) * double(std::numeric_limits<Scalar>::epsilon()) * 10.0);
  CHECK(same_bytes_everywhere(got.data(), got.size() * sizeof(Scalar)));  // every rank holds the same
  CHECK(stats.tokens == std::int64_t(total));
  CHECK(stats.gradient_elements == P);
  CHECK(stats.gradient_bytes == std::size_t(P) * sizeof(Scalar));
  CHECK(stats.bytes == std::size_t(P + 1) * sizeof(Scalar));  // the gradients and the token count
  CHECK(stats.calls == 1);
  CHECK(dp.last_reduce().bytes == stats.bytes);

  SECTION("in buckets: the same bits, one call per bucket") {
    for (std::size_t bucket : {std::size_t(1), std::size_t(7), std::size_t(64), std::size_t(P)}) {
      Model<Scalar> m2(7);
      peft::AdamW<Scalar> opt2;
      m2.add_to(opt2);
      peft::mpi::DataParallelOptions o;
      o.bucket_bytes = bucket * sizeof(Scalar);
      peft::mpi::DataParallel<peft::AdamW<Scalar>> dp2(opt2, MPI_COMM_WORLD, o);
      fill_gradients(opt2, rank, 5);
      if (rank == 1)
        for (auto& p : opt2.flat_parameters()) p.grad.setConstant(std::numeric_limits<Scalar>::quiet_NaN());
      const auto s2 = dp2.average_gradients(tokens(rank));
      CHECK(flat_grads(opt2) == got);
      CHECK(s2.calls == int((std::size_t(P) + 1 + bucket - 1) / bucket));
      CHECK(s2.bytes == stats.bytes);
    }
  }
}

TEST_CASE("clipping after averaging uses the same global norm on every rank") {
  const int rank = world_rank();
  Model<float> model(3);
  peft::AdamW<float> opt;
  model.add_to(opt);
  peft::mpi::DataParallel<peft::AdamW<float>> dp(opt);
  fill_gradients(opt, rank, 1);
  CHECK_THROWS_WITH(dp.clip_grad_norm(1.0f), Contains("not averaged"));  // local norms would differ
  dp.average_gradients(10);
  const double norm = opt.grad_norm();
  const float clipped = dp.clip_grad_norm(0.5f);
  CHECK(double(clipped) == Approx(norm).epsilon(1e-6));
  CHECK(same_everywhere(double(clipped)));
  CHECK(opt.grad_norm() == Approx(0.5).epsilon(1e-5));
  const std::vector<float> g = flat_grads(opt);
  CHECK(same_bytes_everywhere(g.data(), g.size() * sizeof(float)));
  opt.step();
  CHECK_THROWS_AS(dp.clip_grad_norm(1.0f), peft::StateError);  // a new step, not averaged yet
  CHECK_NOTHROW(dp.check_in_sync());
}

TEST_CASE("a bad token count is refused on every rank, gradients untouched") {
  const int rank = world_rank(), size = world_size();
  Model<float> model(3);
  peft::AdamW<float> opt;
  model.add_to(opt);
  peft::mpi::DataParallel<peft::AdamW<float>> dp(opt);
  fill_gradients(opt, rank, 2);
  const std::vector<float> before = flat_grads(opt);

  // The last rank passes a negative count: it says so, the others say another rank could not take part.
  try {
    dp.average_gradients(rank == size - 1 ? -1 : 4);
    FAIL("average_gradients accepted a negative token count");
  } catch (const peft::ConfigError& e) {
    CHECK(rank == size - 1);
    CHECK_THAT(e.what(), Contains("passed -1 tokens"));
  } catch (const peft::StateError& e) {
    CHECK(rank != size - 1);
    CHECK_THAT(e.what(), Contains("another rank could not take part"));
  }
  CHECK(flat_grads(opt) == before);

  // No rank had an example.
  CHECK_THROWS_WITH(dp.average_gradients(0), Contains("no rank had an example"));
  CHECK(flat_grads(opt) == before);
  // More tokens than float counts exactly: every rank refuses.
  if (size > 1)  // each count in range, their sum not
    CHECK_THROWS_WITH(dp.average_gradients(std::int64_t(1) << 23), Contains("sum to 2^24 or more"));
  // 2^24 - 1 and 2: the sum, 2^24 + 1, would round to 2^24 in float.
  if (size > 1)
    CHECK_THROWS_WITH(dp.average_gradients(rank == 0 ? (std::int64_t(1) << 24) - 1 : 2), Contains("2^24 or more"));
  CHECK_THROWS_WITH(dp.average_gradients(rank == 0 ? std::int64_t(1) << 24 : 1),
                    Contains(rank == 0 ? "passed 16777216 tokens, expected 0 .. 2^24 - 1" : "another rank"));
  CHECK(flat_grads(opt) == before);
  // And it still works afterwards.
  CHECK(dp.average_gradients(1).tokens == size);
}

TEST_CASE("a rank registering parameters after construction is refused on every rank") {
  const int rank = world_rank();
  Model<float> model(3);
  peft::AdamW<float> opt;
  model.add_to(opt);
  Eigen::MatrixXf extra = Eigen::MatrixXf::Ones(2, 2), extra_grad = Eigen::MatrixXf::Zero(2, 2);
  peft::mpi::DataParallel<peft::AdamW<float>> dp(opt);
  if (rank == 1) opt.add("extra", extra, extra_grad);
  if (world_size() == 1) return;
  CHECK_THROWS_AS(dp.average_gradients(3), peft::StateError);
  CHECK_THROWS_WITH(dp.broadcast_parameters(), Contains("registered parameters after"));
  CHECK_THROWS_AS(dp.check_in_sync(), peft::StateError);
}

TEST_CASE("a rank whose registered parameters differ from rank 0's is named, on every rank") {
  const int rank = world_rank();
  if (world_size() == 1) return;
  SECTION("a shape") {
    Model<float> model(3, rank == 1 ? 5 : 4);  // rank 1 has r = 5
    peft::AdamW<float> opt;
    model.add_to(opt);
    try {
      peft::mpi::DataParallel<peft::AdamW<float>> dp(opt);
      FAIL("the layouts differ, but DataParallel was built");
    } catch (const peft::ConfigError& e) {
      if (rank == 1)
        CHECK_THAT(e.what(), Contains("this rank (1)'s registered parameters differ from rank 0's: registered block 0 "
                                      "is 'fc1.lora_A 5 10' here, 'fc1.lora_A 4 10' on rank 0") &&
                                 Contains("layout hash"));
      else
        CHECK_THAT(e.what(), Contains("rank 1's registered parameters differ from rank 0's"));
    }
  }
  SECTION("the count") {
    Model<float> model(3);
    peft::AdamW<float> opt;
    model.add_to(opt);
    Eigen::MatrixXf extra = Eigen::MatrixXf::Ones(2, 2), extra_grad = Eigen::MatrixXf::Zero(2, 2);
    if (rank != 0) opt.add("extra", extra, extra_grad);
    try {
      peft::mpi::DataParallel<peft::AdamW<float>> dp(opt);
      FAIL("the layouts differ, but DataParallel was built");
    } catch (const peft::ConfigError& e) {
      CHECK_THAT(e.what(), Contains(rank == 0 ? "rank 1's registered" : "this rank registered 7 blocks, rank 0 6"));
    }
  }
  SECTION("the optimizer and the scalar type") {
    Model<float> model(3);
    peft::AdamW<float> adamw;
    peft::SGD<float> sgd;
    if (rank == 1) {
      model.add_to(sgd);
      CHECK_THROWS_WITH(peft::mpi::DataParallel<peft::SGD<float>>(sgd),
                        Contains("this rank trains 'float peft::SGD bucket_bytes=33554432 broadcast_optimizer_state=1', "
                                 "rank 0 'float peft::AdamW bucket_bytes"));
    } else {
      model.add_to(adamw);
      CHECK_THROWS_AS(peft::mpi::DataParallel<peft::AdamW<float>>(adamw), peft::ConfigError);
    }
    peft::mpi::DataParallelOptions other_buckets;
    other_buckets.bucket_bytes = rank == 1 ? 1024 : other_buckets.bucket_bytes;
    Model<float> model_o(3);
    peft::AdamW<float> adamw_o;
    model_o.add_to(adamw_o);
    try {
      peft::mpi::DataParallel<peft::AdamW<float>> dp(adamw_o, MPI_COMM_WORLD, other_buckets);
      FAIL("the options differ, but DataParallel was built");
    } catch (const peft::ConfigError& e) {
      CHECK_THAT(e.what(), Contains(rank == 1 ? "bucket_bytes=1024 broadcast_optimizer_state=1', rank 0 'float "
                                                "peft::AdamW bucket_bytes=33554432"
                                              : "rank 1's registered parameters differ"));
    }
    Model<double> model_d(3);
    peft::AdamW<double> adamw_d;
    if (rank == 1) {
      model_d.add_to(adamw_d);
      CHECK_THROWS_WITH(peft::mpi::DataParallel<peft::AdamW<double>>(adamw_d),
                        Contains("this rank trains 'double peft::AdamW bucket_bytes=33554432 broadcast_optimizer_state=1', "
                                 "rank 0 'float peft::AdamW"));
    } else {
      Model<float> model_f(3);
      peft::AdamW<float> adamw_f;
      model_f.add_to(adamw_f);
      CHECK_THROWS_AS(peft::mpi::DataParallel<peft::AdamW<float>>(adamw_f), peft::ConfigError);
    }
  }
}

TEST_CASE("check_in_sync finds a rank that changed its parameters alone") {
  const int rank = world_rank();
  Model<double> model(3);
  peft::AdamW<double> opt;
  model.add_to(opt);
  peft::mpi::DataParallel<peft::AdamW<double>> dp(opt);
  CHECK_NOTHROW(dp.check_in_sync());
  if (world_size() == 1) return;
  if (rank == 1) model.head(2, 3) = std::nextafter(model.head(2, 3), 10.0);  // one ulp
  CHECK_THROWS_WITH(dp.check_in_sync(), Contains("parameters differ"));
  dp.broadcast_parameters();  // rank 0's values again
  CHECK_NOTHROW(dp.check_in_sync());
}

TEST_CASE("broadcast gives every rank the root's matrix") {
  const int rank = world_rank();
  Eigen::MatrixXf W;
  if (rank == 0) W = Eigen::MatrixXf::Random(5, 7);
  peft::mpi::broadcast(W);
  CHECK(W.rows() == 5);
  CHECK(W.cols() == 7);
  CHECK(same_bytes_everywhere(W.data(), sizeof(float) * 35));
  Eigen::Matrix<float, 3, 1> fixed = Eigen::Matrix<float, 3, 1>::Constant(float(rank));
  peft::mpi::broadcast(fixed);
  CHECK(fixed(2) == 0.0f);
  if (world_size() == 1) return;
  Eigen::VectorXf v(rank == 0 ? 4 : 3);
  Eigen::Matrix<float, 3, 1> wrong;
  if (rank == 0)
    CHECK_THROWS_AS(peft::mpi::broadcast(v), peft::ShapeError);
  else
    CHECK_THROWS_WITH(peft::mpi::broadcast(wrong), Contains("root's matrix is 4x1, which this rank's fixed-size"));
}

// The property the whole thing is for: p ranks on their shards reach the parameters one process reaches
// on the whole global batches (each rank runs that one-process reference itself, without MPI).
TEMPLATE_TEST_CASE("p ranks train as one: 50 steps of LoRA with AdamW", "", float, double) {
  using Scalar = TestType;
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;
  const int rank = world_rank(), size = world_size();
  const Index n = 53, batch = 8, d_in = 10, d_out = 6;  // 7 steps per epoch, the last one short (5)
  peft::Rng data_rng(11);
  Matrix X(d_in, n), T(d_out, n), W(d_out, d_in);
  data_rng.fill_uniform(X, -1, 1);
  data_rng.fill_uniform(T, -1, 1);
  data_rng.fill_uniform(W, -0.5, 0.5);

  const auto train = [&](peft::LoRA<Matrix>& lora, peft::AdamW<Scalar>& opt, int shard_rank, int shard_size,
                         peft::mpi::DataParallel<peft::AdamW<Scalar>>* dp) {
    peft::BatchShards shards(n, batch, shard_rank, shard_size, 5);
    typename peft::LoRA<Matrix>::Cache cache;
    Matrix Xb, Tb, dY;
    int steps = 0;
    for (int epoch = 0; steps < 50; ++epoch) {
      shards.start_epoch(epoch);
      for (Index step = 0; step < shards.steps_per_epoch() && steps < 50; ++step, ++steps) {
        const auto local = shards.local_batch(step);
        opt.zero_grad();
        if (!local.empty()) {
          Xb.resize(d_in, local.size());
          Tb.resize(d_out, local.size());
          for (Index j = 0; j < local.size(); ++j) {
            Xb.col(j) = X.col(local[j]);
            Tb.col(j) = T.col(local[j]);
          }
          // loss = mean over the local examples of |Y - T|^2 / 2
          dY = (lora.forward(Xb, cache) - Tb) / Scalar(local.size());
          lora.backward_params(dY, cache);
        }
        if (dp) {
          dp->average_gradients(local.size());
          dp->clip_grad_norm(Scalar(0.5));
        } else {
          opt.clip_grad_norm(Scalar(0.5));
        }
        opt.step();
      }
    }
  };
  peft::LoRAConfig cfg;
  cfg.rank = 3;
  cfg.init = peft::LoRAInit::random;
  peft::AdamWConfig acfg;
  acfg.lr = 0.02;

  cfg.seed = 1;
  peft::LoRA<Matrix> reference(W, cfg);
  peft::AdamW<Scalar> ref_opt(acfg);
  ref_opt.add(reference);
  train(reference, ref_opt, 0, 1, nullptr);

  cfg.seed = 1 + std::uint64_t(rank) * 1000;  // only rank 0's initialization survives construction
  peft::LoRA<Matrix> lora(W, cfg);
  peft::AdamW<Scalar> opt(acfg);
  opt.add(lora);
  peft::mpi::DataParallel<peft::AdamW<Scalar>> dp(opt);
  train(lora, opt, rank, size, &dp);
  CHECK_NOTHROW(dp.check_in_sync());

  double worst = 0;
  for (bool a : {true, false}) {
    const Matrix got = a ? Matrix(lora.A()) : Matrix(lora.B());
    const Matrix want = a ? Matrix(reference.A()) : Matrix(reference.B());
    worst = std::max(worst, double((got - want).cwiseAbs().maxCoeff() / want.cwiseAbs().maxCoeff()));
  }
  INFO("max relative difference to one process: " << worst << " on " << size << " ranks");
  CHECK(worst <= (std::is_same<Scalar, float>::value ? 1e-5 : 1e-12));
  CHECK(reference.B().cwiseAbs().maxCoeff() > Scalar(0.05));  // it trained
}

int main(int argc, char** argv) {
  peft::mpi::Session mpi(argc, argv);
  const int failed = Catch::Session().run(argc, argv);
  int any = 0;  // a failure on one rank fails every rank's exit code
  MPI_Allreduce(&failed, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  return any;
}
