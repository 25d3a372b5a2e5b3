// The adapter contract (contract.hpp) for peft::PiSSA, in every matrix type.
#include "contract/fixtures.hpp"

#define PEFT_CONTRACT_FIXTURE peft::test::PiSSAFixture
#define PEFT_CONTRACT_NAME "PiSSA"
#include "contract/contract.hpp"
