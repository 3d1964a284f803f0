// Slot compaction of SepLLM's paged KV caches: raw-pointer kernel interface (no torch headers).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace vllm_sepllm {

// Layer base pointers travel by value in the kernel's parameters: no per-call host-to-device
// copy, nothing to keep alive, and the launch stays capturable in a CUDA graph. 256 pointers
// (2 KiB) stay well inside the 4 KiB parameter limit of every CUDA architecture.
constexpr int kMaxLayers = 256;

struct CompactKVParams {
  char* layers[kMaxLayers];  // each: [num_slots, row_bytes] bytes, slots contiguous
  int num_layers;
  int64_t row_bytes;      // bytes of one slot row (Hkv * 2D * element size), same for all layers
  int32_t* slot_pos;      // [num_slots] logical position of the token in each slot
  bool* slot_sep;         // [num_slots] separator flag of the token in each slot
  const int64_t* src;     // [num_moves] source slots
  const int64_t* dst;     // [num_moves] destination slots, disjoint from src
  int64_t num_moves;
};

// Copies slot src[i] to slot dst[i] for every i, in every layer and in slot_pos / slot_sep, in
// one launch on `stream`. Vectorises with the widest access (16/8/4/2/1 bytes) that divides
// row_bytes and every layer's base address.
cudaError_t launch_compact_kv(const CompactKVParams& params, cudaStream_t stream);

}  // namespace vllm_sepllm
