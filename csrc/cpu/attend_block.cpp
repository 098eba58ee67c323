// Picks the build of attend_tile for the instruction set of this CPU, once.
// See [Note: CPU decode kernel] in attend_block.h.

#include "attend_block.h"

#include <cstdlib>
#include <cstring>

namespace torch_cp {
namespace {

using TileFn = void (*)(const TileArgs&, float*, float*, float*, float*);

// TORCH_CP_CPU_ISA=avx2|default caps the instruction set (as ATEN_CPU_CAPABILITY does for ATen):
// for tests of the narrower builds and for comparing them; a cap above what the CPU has is ignored.
int isa_cap() {
  const char* env = std::getenv("TORCH_CP_CPU_ISA");
  if (env == nullptr) return 2;
  if (std::strcmp(env, "default") == 0) return 0;
  if (std::strcmp(env, "avx2") == 0) return 1;
  return 2;
}

TileFn pick() {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  __builtin_cpu_init();
  const int cap = isa_cap();
  if (cap >= 2 && __builtin_cpu_supports("x86-64-v4")) return attend_tile_v4;
  if (cap >= 1 && __builtin_cpu_supports("x86-64-v3")) return attend_tile_v3;
#endif
  return attend_tile_base;
}

}  // namespace

void attend_tile(const TileArgs& a, float* scores, float* m, float* l, float* acc) {
  static const TileFn fn = pick();
  fn(a, scores, m, l, acc);
}

}  // namespace torch_cp
