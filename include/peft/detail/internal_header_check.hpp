// The first include of every header under peft/detail/ (as Eigen's InternalHeaderCheck.h): those
// headers are the library's implementation, included by its public headers, which include
// peft/core/config.hpp first. Included on its own by a program, a detail header stops the build here.
// Use a public header (<peft/peft.hpp>, <peft/io.hpp>, <peft/mpi.hpp>, or one of their parts); what is
// under peft/detail/ may change in any release.
#ifndef PEFT_CORE_CONFIG_INCLUDED
#error "peft/detail/ headers are internal: include a public peft header (e.g. <peft/peft.hpp>) instead"
#endif
