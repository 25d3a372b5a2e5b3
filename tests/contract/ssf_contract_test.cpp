// The adapter contract (contract.hpp) for peft::SSF, in every matrix type.
#include "contract/fixtures.hpp"

#define PEFT_CONTRACT_FIXTURE peft::test::SSFFixture
#define PEFT_CONTRACT_NAME "SSF"
#include "contract/contract.hpp"
