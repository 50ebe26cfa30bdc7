// <immintrin.h> for the per-ISA kernel files. Include this instead of <immintrin.h> directly,
// before any other header that includes it.
#pragma once

#ifndef KT_CPU_CAPABILITY
#error "intrinsics.h belongs to the per-ISA kernel files only"
#endif

#if defined(__GNUC__) && !defined(__clang__)
// GCC 12's AVX-512 headers initialise placeholder vectors from themselves (_mm512_undefined_*)
// and then report them as uninitialised once inlined (GCC bug 105593, fixed in later releases).
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include <immintrin.h>
