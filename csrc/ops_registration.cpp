// Operator schemas of the e3fast namespace and the Python module stub of e3fast._C.
//
// Kernels register per device in csrc/cpu/*.cpp (TORCH_LIBRARY_IMPL(e3fast, CPU, ...)) and
// csrc/cuda/*.cu (TORCH_LIBRARY_IMPL(e3fast, CUDA, ...)). Shape functions (register_fake) and
// autograd (register_autograd) are registered from Python, in e3fast/ops/*.py, next to the
// pure-PyTorch reference of each op. The integer tables are documented there as well.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import e3fast._C` only needs to load this library: the static initializers below register
// the operators with the dispatcher.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(e3fast, m) {
  // Steerable kernel assembly (e3fast/ops/kernel_assembly.py, e3fast/steerable_basis.py).
  m.def(
      "assemble_kernel(Tensor radial_weight, Tensor sc_weight, Tensor basis, Tensor paths, "
      "Tensor self_connections, float[] sc_scales, int out_dim, int in_dim, int[] kernel_size) -> Tensor");
  m.def(
      "assemble_kernel_backward(Tensor grad_kernel, Tensor basis, Tensor paths, Tensor self_connections, "
      "float[] sc_scales, int num_radial, int radial_numel, int sc_numel) -> (Tensor, Tensor)");
  // Equivariant normalization + gate (e3fast/ops/norm_gate.py, e3fast/gate_layout.py).
  m.def(
      "norm_gate(Tensor x, Tensor? weight, Tensor? bias, Tensor? running_mean, Tensor? running_var, "
      "Tensor fields, Tensor gates, float[] act_scales, int num_scalars, int mode, float eps) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "norm_gate_backward(Tensor grad_y, Tensor x, Tensor? weight, Tensor? bias, Tensor mean, Tensor var, "
      "Tensor fields, Tensor gates, float[] act_scales, int mode, float eps) -> (Tensor, Tensor, Tensor)");
  // Norm-based max pooling (e3fast/ops/norm_max_pool.py).
  m.def("norm_max_pool3d(Tensor x, Tensor fields, int[] kernel_size, int[] stride) -> (Tensor, Tensor)");
  m.def(
      "norm_max_pool3d_backward(Tensor grad_y, Tensor argmax, Tensor fields, int[] input_size, "
      "int[] kernel_size, int[] stride) -> Tensor");
}
