// The CPU decode kernel's inner loop compiled for x86-64-v3 (picked at run time by attend_block.cpp).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>

#include "attend_block.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC target("arch=x86-64-v3")
#define TORCH_CP_ISA_FN attend_tile_v3
#define TORCH_CP_VEC_BYTES 32
#include "attend_block_impl.h"
#endif
