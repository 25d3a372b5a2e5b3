#pragma once
/// \file traits.hpp
/// \brief `peft::is_trainable_v<T>` and `peft::is_adapter_v<T>`: compile-time checks of the contracts,
/// for generic code (optimizers, io, the gradient checker).

#include "peft/core/types.hpp"

#include <type_traits>
#include <utility>

namespace peft {
namespace detail {

template <class...>
using void_t = void;

template <class T, class = void>
struct is_trainable_impl : std::false_type {};

template <class T>
struct is_trainable_impl<
    T, void_t<typename T::Scalar, typename T::Matrix, typename T::Cache,
              decltype(std::declval<const T&>().forward(std::declval<const typename T::Matrix&>())),
              decltype(std::declval<T&>().forward(std::declval<const typename T::Matrix&>(),
                                                  std::declval<typename T::Cache&>())),
              decltype(std::declval<T&>().backward(std::declval<const typename T::Matrix&>(),
                                                   std::declval<typename T::Cache&>())),
              decltype(std::declval<T&>().parameters()), decltype(std::declval<T&>().zero_grad()),
              decltype(std::declval<T&>().flat_values()), decltype(std::declval<T&>().flat_grads())>>
    : std::true_type {};

template <class T, class = void>
struct has_merge_impl : std::false_type {};

template <class T>
struct has_merge_impl<T, void_t<typename T::MatrixType, decltype(std::declval<T&>().merge()),
                                decltype(std::declval<T&>().unmerge()), decltype(std::declval<const T&>().is_merged()),
                                decltype(std::declval<const T&>().delta_weight())>> : std::true_type {};

}  // namespace detail

/// \brief True when T can be trained from a user's loop: `Scalar`, `Matrix`, `Cache`, `forward(X)`,
/// `forward(X, cache)`, `backward(dY, cache)`, `parameters()`, `zero_grad()`, `flat_values()`,
/// `flat_grads()`. Adapters and StandaloneSSF are; what optimizers and the gradient checker need.
template <class T>
struct is_trainable : detail::is_trainable_impl<std::remove_cv_t<std::remove_reference_t<T>>> {};

/// \brief `is_trainable<T>::value`.
template <class T>
inline constexpr bool is_trainable_v = is_trainable<T>::value;

/// \brief True when T provides the whole adapter contract (docs/extending.md): trainable, plus `MatrixType`,
/// `merge()`, `unmerge()`, `is_merged()` and `delta_weight()`.
template <class T>
struct is_adapter
    : std::integral_constant<bool, is_trainable_v<T> &&
                                       detail::has_merge_impl<std::remove_cv_t<std::remove_reference_t<T>>>::value> {};

/// \brief `is_adapter<T>::value`.
template <class T>
inline constexpr bool is_adapter_v = is_adapter<T>::value;

}  // namespace peft
