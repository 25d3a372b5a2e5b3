#pragma once
/// \file types.hpp
/// \brief Scalar and matrix aliases, and the compile-time check on an adapter's weight type.

#include <Eigen/Core>

#include <type_traits>

// A translation unit that links the compiled part (peft::compiled) must be compiled against the same
// Eigen, with the same largest alignment (set by the vectorization flags), as the compiled part was: its
// matrices are allocated on one side and resized or freed on the other.
#if defined(PEFT_COMPILED_EIGEN_MAX_ALIGN_BYTES) && PEFT_COMPILED_EIGEN_MAX_ALIGN_BYTES != EIGEN_MAX_ALIGN_BYTES
#error "peft::compiled was built with another vectorization than this translation unit (Eigen's \
EIGEN_MAX_ALIGN_BYTES differs): build both with the same -m/-march flags, or link peft::peft (header-only)"
#endif
#if defined(PEFT_COMPILED_EIGEN_VERSION) && \
    PEFT_COMPILED_EIGEN_VERSION != EIGEN_WORLD_VERSION * 10000 + EIGEN_MAJOR_VERSION * 100 + EIGEN_MINOR_VERSION
#error "peft::compiled was built against another Eigen version than this translation unit: rebuild it \
against this Eigen, or link peft::peft (header-only)"
#endif

// The BLAS backend (CMake option PEFT_BLAS) defines both PEFT_BLAS and EIGEN_USE_BLAS, which change
// inline bodies: every translation unit of a program, and the compiled part, must agree.
#if defined(PEFT_BLAS) && !defined(EIGEN_USE_BLAS)
#error "peft: PEFT_BLAS (the BLAS backend) needs EIGEN_USE_BLAS too; link peft::peft, which defines both"
#endif
#if defined(PEFT_COMPILED_BLAS) && PEFT_COMPILED_BLAS != defined(PEFT_BLAS)
#error "peft::compiled was built with the BLAS backend set otherwise than this translation unit \
(PEFT_BLAS): define it in both or neither, or link peft::peft (header-only)"
#endif

namespace peft {

/// Eigen's index type, used for every size.
using Index = Eigen::Index;

/// \brief Column-major dynamic matrix of `Scalar`: activations (X, Y, dY, dX) and adapter parameters.
template <class Scalar>
using MatrixX = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;

/// \brief Dynamic column vector of `Scalar`: biases, magnitudes, flat parameter buffers.
template <class Scalar>
using VectorX = Eigen::Matrix<Scalar, Eigen::Dynamic, 1>;

/// \brief Row-major dynamic matrices (the layout of a PyTorch weight): with Eigen::MatrixXf and
/// Eigen::MatrixXd, the weight types the compiled part (peft::compiled) instantiates the adapters for.
using RowMajorMatrixXf = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using RowMajorMatrixXd = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

namespace detail {

template <class T>
struct is_plain_dynamic_matrix : std::false_type {};

template <class S, int Options, int MaxRows, int MaxCols>
struct is_plain_dynamic_matrix<Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic, Options, MaxRows, MaxCols>>
    : std::true_type {};

/// Static checks shared by every adapter template. Each message says what to use instead.
template <class MatrixType>
struct check_weight_type {
  static_assert(is_plain_dynamic_matrix<MatrixType>::value,
                "peft: the adapter's MatrixType must be a plain dynamic-size Eigen::Matrix "
                "(e.g. Eigen::MatrixXf, or Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, "
                "Eigen::RowMajor>), not a fixed-size matrix, an Array or an expression; wrap a "
                "fixed-size or mapped weight with Eigen::Map of a dynamic type instead");
  static_assert(std::is_same<typename Eigen::internal::traits<MatrixType>::Scalar, float>::value ||
                    std::is_same<typename Eigen::internal::traits<MatrixType>::Scalar, double>::value,
                "peft: the adapter's Scalar must be float or double");
  static constexpr bool value = true;
};

}  // namespace detail
}  // namespace peft
