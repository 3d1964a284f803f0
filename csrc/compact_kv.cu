// Slot compaction of SepLLM's paged KV caches, all layers in one launch.
//
// Grid: x = move (one (src, dst) pair), y = layer, z = chunk of the slot row. Each thread copies
// one vector of the row. Sources and destinations are disjoint, so the blocks need no ordering:
// every read sees the pre-launch value.

#include "compact_kv.h"

#include <algorithm>

namespace vllm_sepllm {
namespace {

constexpr int kMaxThreads = 256;

template <typename Vec>
__global__ void compact_kv_kernel(const CompactKVParams p) {
  const int64_t move = blockIdx.x;
  const int64_t src = p.src[move];
  const int64_t dst = p.dst[move];
  const int64_t row_vecs = p.row_bytes / static_cast<int64_t>(sizeof(Vec));
  const int64_t v = static_cast<int64_t>(blockIdx.z) * blockDim.x + threadIdx.x;
  if (v < row_vecs) {
    Vec* base = reinterpret_cast<Vec*>(p.layers[blockIdx.y]);
    base[dst * row_vecs + v] = base[src * row_vecs + v];
  }
  // The per-slot records ride along with the first block of each move.
  if (blockIdx.y == 0 && blockIdx.z == 0 && threadIdx.x == 0) {
    p.slot_pos[dst] = p.slot_pos[src];
    p.slot_sep[dst] = p.slot_sep[src];
  }
}

template <typename Vec>
cudaError_t launch(const CompactKVParams& p, cudaStream_t stream) {
  const int64_t row_vecs = p.row_bytes / static_cast<int64_t>(sizeof(Vec));
  // Whole warps, at most kMaxThreads, at least one warp even for tiny rows.
  const int threads = static_cast<int>(
      std::min<int64_t>(kMaxThreads, std::max<int64_t>(32, (row_vecs + 31) / 32 * 32)));
  const int64_t chunks = std::max<int64_t>(1, (row_vecs + threads - 1) / threads);
  const dim3 grid(static_cast<unsigned>(p.num_moves), static_cast<unsigned>(p.num_layers),
                  static_cast<unsigned>(chunks));
  compact_kv_kernel<Vec><<<grid, threads, 0, stream>>>(p);
  return cudaGetLastError();
}

// Widest power-of-two access width (<= 16 bytes) dividing the row size and every base address.
int vector_bytes(const CompactKVParams& p) {
  uint64_t bits = static_cast<uint64_t>(p.row_bytes) | 16u;
  for (int i = 0; i < p.num_layers; ++i) bits |= reinterpret_cast<uintptr_t>(p.layers[i]);
  return static_cast<int>(bits & (~bits + 1));  // lowest set bit
}

}  // namespace

cudaError_t launch_compact_kv(const CompactKVParams& p, cudaStream_t stream) {
  if (p.num_moves == 0) return cudaSuccess;
  // An empty layer list still moves the per-slot records: launch one "layer" with no row.
  CompactKVParams q = p;
  if (q.num_layers == 0) {
    q.num_layers = 1;
    q.layers[0] = nullptr;
    q.row_bytes = 0;
  }
  switch (vector_bytes(q)) {
    case 16: return launch<uint4>(q, stream);
    case 8: return launch<uint2>(q, stream);
    case 4: return launch<uint32_t>(q, stream);
    case 2: return launch<uint16_t>(q, stream);
    default: return launch<uint8_t>(q, stream);
  }
}

}  // namespace vllm_sepllm
