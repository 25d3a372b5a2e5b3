#pragma once
/// \file peft.hpp
/// \brief Umbrella header of everything in the library that needs only Eigen (CMake target `peft::peft`):
/// the adapters, the optimizers and the schedule, whole models (peft::AdapterSet), the shard planner of
/// data-parallel training and the gradient checker. The file formats are in <peft/io.hpp> (`peft::io`),
/// the MPI side of data-parallel training in <peft/mpi.hpp> (`peft::mpi`). Headers under peft/detail/ are
/// the implementation, not the API.

#include "peft/core/config.hpp"
#include "peft/version.hpp"

#include "peft/core/adapter_base.hpp"
#include "peft/core/error.hpp"
#include "peft/core/half.hpp"
#include "peft/core/parameter.hpp"
#include "peft/core/random.hpp"
#include "peft/core/threads.hpp"
#include "peft/core/trainable_base.hpp"
#include "peft/core/traits.hpp"
#include "peft/core/types.hpp"

#include "peft/linalg/svd.hpp"

#include "peft/adapters/dora.hpp"
#include "peft/adapters/lora.hpp"
#include "peft/adapters/lora_config.hpp"
#include "peft/adapters/lora_family.hpp"
#include "peft/adapters/pissa.hpp"
#include "peft/adapters/ssf.hpp"
#include "peft/adapters/ssf_config.hpp"
#include "peft/adapters/standalone_ssf.hpp"

#include "peft/optim/adamw.hpp"
#include "peft/optim/optimizer.hpp"
#include "peft/optim/schedule.hpp"
#include "peft/optim/sgd.hpp"

#include "peft/model/adapter_set.hpp"
#include "peft/model/any_adapter.hpp"
#include "peft/model/targets.hpp"

#include "peft/distributed/shard.hpp"

#include "peft/testing/grad_check.hpp"
