// The schemas of every cbd_fast op, in one place. Implementations register per device key in
// nt_xent_cpu.cpp / pgd_cpu.cpp (CPU) and nt_xent_cuda.cpp / pgd_cuda.cpp (CUDA).
// Fake (meta) implementations live in each op's Python module (cbd_fast/ops/*.py), torch.library.register_fake.
#include <torch/library.h>

TORCH_LIBRARY(cbd_fast, m) {
  // NT-Xent on L2-normalised rows za, zb: [N, D] (float32/bfloat16/float16, contiguous).
  // Returns (loss: 0-dim float32 mean over the 2N rows, lse: [2N] float32 per-row log-sum-exp
  // over j != i of s_ij = inv_temp * <u_i, u_j>).
  m.def("nt_xent_fwd(Tensor za, Tensor zb, float inv_temp) -> (Tensor, Tensor)");
  // Gradients w.r.t. za and zb given grad (0-dim float32) of the loss; a side not needed is
  // returned as an empty tensor and costs nothing. Outputs have za's dtype.
  m.def("nt_xent_bwd(Tensor grad, Tensor za, Tensor zb, Tensor lse, float inv_temp, "
        "bool need_a, bool need_b) -> (Tensor, Tensor)");
  // x_adv <- clamp(clamp(x_adv + step_size * sign(grad), x_clean - eps, x_clean + eps), lower, upper)
  m.def("pgd_step_(Tensor(a!) x_adv, Tensor grad, Tensor x_clean, float step_size, "
        "float epsilon, float lower, float upper) -> ()");
}
