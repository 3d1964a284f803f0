// Torch bindings of the vllm_sepllm CUDA ops. Importing the `vllm_sepllm._C` module registers
// them as torch.ops.vllm_sepllm.*; the kernels themselves live in *.cu on raw pointers.

#include <Python.h>

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include "compact_kv.h"

namespace vllm_sepllm {
namespace {

void compact_kv(const std::vector<at::Tensor>& kv_caches, at::Tensor& slot_pos,
                at::Tensor& slot_sep, const at::Tensor& src, const at::Tensor& dst) {
  TORCH_CHECK(src.is_cuda() && src.scalar_type() == at::kLong && src.dim() == 1 &&
                  src.is_contiguous(),
              "compact_kv: src must be a contiguous 1-D int64 CUDA tensor");
  TORCH_CHECK(dst.device() == src.device() && dst.scalar_type() == at::kLong &&
                  dst.sizes() == src.sizes() && dst.is_contiguous(),
              "compact_kv: dst must match src (device, dtype int64, shape)");
  TORCH_CHECK(src.numel() <= INT32_MAX, "compact_kv: too many moves: ", src.numel());
  TORCH_CHECK(slot_pos.device() == src.device() && slot_pos.scalar_type() == at::kInt &&
                  slot_pos.dim() == 1 && slot_pos.is_contiguous(),
              "compact_kv: slot_pos must be a contiguous 1-D int32 tensor on src's device");
  TORCH_CHECK(slot_sep.device() == src.device() && slot_sep.scalar_type() == at::kBool &&
                  slot_sep.sizes() == slot_pos.sizes() && slot_sep.is_contiguous(),
              "compact_kv: slot_sep must be a contiguous bool tensor shaped like slot_pos");
  TORCH_CHECK(kv_caches.size() <= static_cast<size_t>(kMaxLayers), "compact_kv: at most ",
              kMaxLayers, " layers, got ", kv_caches.size());

  CompactKVParams p{};
  p.num_layers = static_cast<int>(kv_caches.size());
  p.row_bytes = 0;
  for (size_t i = 0; i < kv_caches.size(); ++i) {
    const at::Tensor& kv = kv_caches[i];
    TORCH_CHECK(kv.device() == src.device() && kv.is_contiguous() && kv.dim() >= 2,
                "compact_kv: kv_caches[", i,
                "] must be a contiguous [num_blocks, block_size, ...] tensor on src's device");
    TORCH_CHECK(kv.size(0) * kv.size(1) == slot_pos.numel(), "compact_kv: kv_caches[", i,
                "] has ", kv.size(0) * kv.size(1), " slots, slot_pos has ", slot_pos.numel());
    const int64_t row_bytes = c10::multiply_integers(kv.sizes().slice(2)) * kv.element_size();
    TORCH_CHECK(i == 0 || row_bytes == p.row_bytes,
                "compact_kv: all layers need the same slot size in bytes");
    p.row_bytes = row_bytes;
    p.layers[i] = static_cast<char*>(kv.data_ptr());
  }
  p.slot_pos = slot_pos.data_ptr<int32_t>();
  p.slot_sep = slot_sep.data_ptr<bool>();
  p.src = src.data_ptr<int64_t>();
  p.dst = dst.data_ptr<int64_t>();
  p.num_moves = src.numel();

  const c10::cuda::CUDAGuard guard(src.device());
  C10_CUDA_CHECK(launch_compact_kv(p, c10::cuda::getCurrentCUDAStream()));
}

}  // namespace

TORCH_LIBRARY(vllm_sepllm, m) {
  // Copy slot src[i] to slot dst[i] in every layer's KV cache and in the per-slot records, in
  // one kernel launch. src and dst are disjoint int64 slot ids. All three destinations are
  // declared mutated so functionalization (torch.compile) keeps the writes.
  m.def(
      "compact_kv(Tensor(a!)[] kv_caches, Tensor(b!) slot_pos, Tensor(c!) slot_sep, "
      "Tensor src, Tensor dst) -> ()");
}

TORCH_LIBRARY_IMPL(vllm_sepllm, CUDA, m) { m.impl("compact_kv", &compact_kv); }

}  // namespace vllm_sepllm

// A bare Python module: importing it runs the registrations above.
PyMODINIT_FUNC PyInit__C() {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, 0, nullptr};
  return PyModule_Create(&module);
}
