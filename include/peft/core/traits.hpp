#pragma once
/// \file traits.hpp
/// \brief `peft::is_adapter_v<T>`: compile-time check of the adapter contract, for generic code
/// (optimizers, io, the gradient checker).

#include "peft/core/types.hpp"

#include <type_traits>
#include <utility>

namespace peft {
namespace detail {

template <class...>
using void_t = void;

template <class T, class = void>
struct is_adapter_impl : std::false_type {};

template <class T>
struct is_adapter_impl<
    T, void_t<typename T::MatrixType, typename T::Scalar, typename T::Matrix, typename T::Cache,
              decltype(std::declval<const T&>().forward(std::declval<const typename T::Matrix&>())),
              decltype(std::declval<T&>().forward(std::declval<const typename T::Matrix&>(),
                                                  std::declval<typename T::Cache&>())),
              decltype(std::declval<T&>().backward(std::declval<const typename T::Matrix&>(),
                                                   std::declval<typename T::Cache&>())),
              decltype(std::declval<T&>().parameters()), decltype(std::declval<T&>().zero_grad()),
              decltype(std::declval<T&>().merge()), decltype(std::declval<T&>().unmerge()),
              decltype(std::declval<const T&>().is_merged()), decltype(std::declval<const T&>().delta_weight()),
              decltype(std::declval<T&>().flat_values()), decltype(std::declval<T&>().flat_grads())>>
    : std::true_type {};

}  // namespace detail

/// \brief True when T provides the adapter contract of DESIGN.md: `Scalar`, `Matrix`, `Cache`,
/// `forward(X)`, `forward(X, cache)`, `backward(dY, cache)`, `parameters()`, `zero_grad()`, `merge()`,
/// `unmerge()`, `is_merged()`, `delta_weight()`, `flat_values()`, `flat_grads()`.
template <class T>
struct is_adapter : detail::is_adapter_impl<std::remove_cv_t<std::remove_reference_t<T>>> {};

/// \brief `is_adapter<T>::value`.
template <class T>
inline constexpr bool is_adapter_v = is_adapter<T>::value;

}  // namespace peft
