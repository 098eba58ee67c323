// The CPU decode kernel's inner loop for any CPU (the compiler's baseline instruction set).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>

#include "attend_block.h"

#define TORCH_CP_ISA_FN attend_tile_base
#include "attend_block_impl.h"
