#pragma once
/// \file peft.hpp
/// \brief Umbrella header: everything in the library that needs only Eigen.

#include "peft/version.hpp"

#include "peft/core/adapter_base.hpp"
#include "peft/core/checks.hpp"
#include "peft/core/config.hpp"
#include "peft/core/error.hpp"
#include "peft/core/merge_state.hpp"
#include "peft/core/parameter.hpp"
#include "peft/core/parameter_store.hpp"
#include "peft/core/random.hpp"
#include "peft/core/threads.hpp"
#include "peft/core/trainable_base.hpp"
#include "peft/core/traits.hpp"
#include "peft/core/types.hpp"

#include "peft/linalg/low_rank.hpp"
#include "peft/linalg/product_plan.hpp"
#include "peft/linalg/row_norms.hpp"
#include "peft/linalg/row_scaling.hpp"
#include "peft/linalg/stack_product.hpp"
#include "peft/linalg/svd.hpp"

#include "peft/adapters/dora.hpp"
#include "peft/adapters/lora.hpp"
#include "peft/adapters/lora_config.hpp"
#include "peft/adapters/lora_family.hpp"
#include "peft/adapters/low_rank_branch.hpp"
#include "peft/adapters/pissa.hpp"
#include "peft/adapters/ssf.hpp"
#include "peft/adapters/ssf_config.hpp"
#include "peft/adapters/standalone_ssf.hpp"

#include "peft/optim/adamw.hpp"
#include "peft/optim/optimizer.hpp"
#include "peft/optim/schedule.hpp"
#include "peft/optim/sgd.hpp"
