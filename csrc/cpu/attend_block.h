// The inner loop of the CPU decode kernel: online softmax over one tile of keys.
//
// [Note: CPU decode kernel]
// Decode is memory-bound: every key and value row is read once from memory and reused from L1
// for all the query rows that share it (the G = Hq/Hkv heads of a GQA group times Sq queries).
// Per tile of T keys: scores S = q·kᵀ (q pre-scaled), optional softcap and mask, a running max m
// and sum l per query row (the "online softmax"), acc = acc·exp(m_old − m_new) + P·V.
// The loops use 16-float vectors (GCC vector extensions) with several independent accumulators;
// attend_block_impl.h is compiled for x86-64-v4 (AVX-512), x86-64-v3 (AVX2+FMA) and the baseline,
// and attend_block.cpp picks one for this CPU at the first call (TORCH_CP_CPU_ISA=avx2|default caps
// it). Scores are summed across lanes for 16 accumulators at once ([Note: transposed reduction])
// and the softmax runs on whole vectors with an inline exp: per 32-key tile of 4 query rows, on
// one Zen-class core with the data in cache, this took the tile from ~2450 to ~1850 cycles (the
// multiply-adds alone are ~1000), which let prefetching keep the kernel near the memory's speed.
#pragma once

#include <cstdint>

namespace torch_cp {

struct TileArgs {
  const float* q;    // [rows, dim] query rows, already multiplied by the score scale
  const float* k;    // [n_keys, ...] key rows, ld_k floats apart
  const float* v;    // [n_keys, ...] value rows, ld_v floats apart
  const float* bias; // [rows, n_keys] added to the scores (-inf: hidden), or nullptr
  int64_t rows, dim, n_keys, ld_k, ld_v;
  float softcap;     // 0: off; else s -> softcap * tanh(s / softcap)
};

// Updates the running state (m [rows], l [rows], acc [rows, dim]) with one tile of keys.
// `scores` is scratch of rows * n_keys floats.
void attend_tile(const TileArgs& a, float* scores, float* m, float* l, float* acc);

// The builds per instruction set (x86-64 only for v3/v4).
void attend_tile_base(const TileArgs& a, float* scores, float* m, float* l, float* acc);
void attend_tile_v3(const TileArgs& a, float* scores, float* m, float* l, float* acc);
void attend_tile_v4(const TileArgs& a, float* scores, float* m, float* l, float* acc);

}  // namespace torch_cp
