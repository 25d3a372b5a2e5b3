// The compile-time benchmark's floor (scripts/compile_bench.sh): user_program.cpp's own Eigen code, with
// the two adapters replaced by the plain frozen layers a user had before (forward, input gradient). What
// this program costs to compile is not the library's; the difference to user_program.cpp is.
#include <Eigen/Core>

#include <cstdio>

namespace {

template <class Scalar, class FirstWeight>
double run(std::uint64_t seed) {
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;
  using Vector = Eigen::Matrix<Scalar, Eigen::Dynamic, 1>;
  const Eigen::Index d_in = 24, hidden = 32, d_out = 8, batch = 16;
  std::srand(static_cast<unsigned>(seed));
  const FirstWeight W1 = FirstWeight::Random(hidden, d_in);
  const Matrix W2 = Matrix::Random(d_out, hidden);
  const Vector b1 = Vector::Random(hidden), b2 = Vector::Random(d_out);
  Matrix X, target, H, A, Y, dY, dA, dH, dX;
  double loss = 0.0;
  for (int step = 0; step < 50; ++step) {
    X = Matrix::Random(d_in, batch);
    target = Matrix::Random(d_out, batch);
    H = (W1 * X).colwise() + b1;
    A = H.cwiseMax(Scalar(0));
    Y = (W2 * A).colwise() + b2;
    dY = (Y - target) / Scalar(batch);
    loss = 0.5 * double((Y - target).squaredNorm()) / double(batch);
    dA = W2.transpose() * dY;
    dH = dA.cwiseProduct((H.array() > Scalar(0)).template cast<Scalar>().matrix());
    dX = W1.transpose() * dH;
  }
  Matrix merged = W2 * ((W1 * X).colwise() + b1).cwiseMax(Scalar(0));
  merged.colwise() += b2;
  std::printf("loss %.3e, output %.3e, input gradient %.3e\n", loss, double(merged.norm()), double(dX.norm()));
  return double(merged.norm());
}

}  // namespace

int main() {
  using RowMajorXf = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  const double e = run<float, Eigen::MatrixXf>(1) + run<float, RowMajorXf>(2) + run<double, Eigen::MatrixXd>(3);
  return e > 0 ? 0 : 1;
}
