// Picks the build of attend_tile for the instruction set of this CPU, once.
// See [Note: CPU decode kernel] in attend_block.h.

#include "attend_block.h"

namespace torch_cp {
namespace {

using TileFn = void (*)(const TileArgs&, float*, float*, float*, float*);

TileFn pick() {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) return attend_tile_v4;
  if (__builtin_cpu_supports("x86-64-v3")) return attend_tile_v3;
#endif
  return attend_tile_base;
}

}  // namespace

void attend_tile(const TileArgs& a, float* scores, float* m, float* l, float* acc) {
  static const TileFn fn = pick();
  fn(a, scores, m, l, acc);
}

}  // namespace torch_cp
