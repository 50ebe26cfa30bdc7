// The ISAs of kt-kernels, lowest first: the one list the rest is derived from. The Isa enum, the
// names (KT_KERNELS_ISA values, `kt_kernels.ISAS`, pytest ids), the CPU check, the order of the
// self-test fallback and of the null-entry fallback (kernels/dispatch.cpp) come from it here;
// CMakeLists.txt reads the compiler flags from it and builds the folder kernels/<name>/ of each.
//
//   X(name, compiler flags, CPU features)
//
// Both the flags and the features are those added to the ISA on the line above: an ISA compiles
// with the flags of every line up to its own and runs where the features of every line up to its
// own are present (`f` is the runtime::CpuFeatures of this CPU). So every ISA that runs here can
// run the ones below it, whose entries fill those it leaves null. Keep each entry on one line:
// CMakeLists.txt reads the `X(name, "flags"` that starts each line.
#pragma once

// clang-format off
#define KT_ISA_LIST(X) \
  X(scalar,      "",                                             true) \
  X(avx2,        "-mavx2 -mfma -mf16c",                          f.avx2 && f.fma && f.f16c) \
  X(avx512,      "-mavx512f -mavx512bw -mavx512vl -mavx512dq",   f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq) \
  X(avx512_vnni, "-mavx512vnni",                                 f.avx512_vnni) \
  X(avx512_bf16, "-mavx512bf16",                                 f.avx512_bf16) \
  X(amx,         "-mamx-tile -mamx-bf16 -mamx-int8",             f.amx_tile && f.amx_bf16 && f.amx_int8)
// clang-format on
