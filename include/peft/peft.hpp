#pragma once
/// \file peft.hpp
/// \brief Umbrella header: everything in the library.

#include "peft/version.hpp"

#include "peft/core/adapter_base.hpp"
#include "peft/core/config.hpp"
#include "peft/core/error.hpp"
#include "peft/core/merge_state.hpp"
#include "peft/core/parameter.hpp"
#include "peft/core/parameter_store.hpp"
#include "peft/core/random.hpp"
#include "peft/core/traits.hpp"
#include "peft/core/types.hpp"

#include "peft/linalg/low_rank.hpp"
#include "peft/linalg/svd.hpp"

#include "peft/adapters/dora.hpp"
#include "peft/adapters/lora.hpp"
#include "peft/adapters/pissa.hpp"
#include "peft/adapters/ssf.hpp"

#include "peft/optim/adamw.hpp"
#include "peft/optim/optimizer.hpp"
#include "peft/optim/schedule.hpp"
#include "peft/optim/sgd.hpp"
