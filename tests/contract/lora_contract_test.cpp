// The adapter contract (contract.hpp) for peft::LoRA, in every matrix type.
#include "contract/fixtures.hpp"

#define PEFT_CONTRACT_FIXTURE peft::test::LoRAFixture
#define PEFT_CONTRACT_NAME "LoRA"
#include "contract/contract.hpp"
