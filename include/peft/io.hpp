#pragma once
/// \file io.hpp
/// \brief Umbrella header of the file formats (CMake target `peft::io`, which adds nlohmann-json):
/// safetensors files, Hugging Face PEFT adapter directories, whole models' adapters and checkpoints, the
/// merge of an adapter into a model (`peft-merge`) and the export to llama.cpp (`peft-export-gguf`).

#include "peft/peft.hpp"

#include "peft/io/adapter_set_io.hpp"
#include "peft/io/gguf.hpp"
#include "peft/io/gguf_export.hpp"
#include "peft/core/half.hpp"
#include "peft/io/merge.hpp"
#include "peft/io/merge_model.hpp"
#include "peft/io/peft_adapter.hpp"
#include "peft/io/peft_load.hpp"
#include "peft/io/safetensors.hpp"
