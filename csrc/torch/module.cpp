// A Python module shell for the extension: importing cbd_fast._C runs the static TORCH_LIBRARY
// registrations of every translation unit. No pybind11 (keeps the build ~5x faster).
// Module attribute: cpu_isa, the instruction set the NT-Xent CPU kernel picked on this machine
// ("avx512", "avx2" or "baseline"; csrc/kernels/nt_xent_cpu.h), shown by `python -m cbd_fast.info`.
#include <Python.h>

#include "kernels/nt_xent_cpu.h"

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                                          "cbd_fast compiled ops (see torch.ops.cbd_fast)", -1,
                                          nullptr};
  PyObject* m = PyModule_Create(&module_def);
  if (m != nullptr && PyModule_AddStringConstant(m, "cpu_isa", cbd_fast::nt_xent_cpu::isa_name()) != 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
}
