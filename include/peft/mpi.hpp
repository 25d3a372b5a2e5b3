#pragma once
/// \file mpi.hpp
/// \brief Umbrella header of data-parallel training over MPI (CMake target `peft::mpi`, which adds MPI):
/// peft::mpi::DataParallel and the shard planner peft::BatchShards.

#include "peft/peft.hpp"

#include "peft/distributed/mpi.hpp"
#include "peft/distributed/shard.hpp"
