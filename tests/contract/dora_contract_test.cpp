// The adapter contract (contract.hpp) for peft::DoRA, in every matrix type.
#include "contract/fixtures.hpp"

#define PEFT_CONTRACT_FIXTURE peft::test::DoRAFixture
#define PEFT_CONTRACT_NAME "DoRA"
#include "contract/contract.hpp"
