// A Python module shell for the extension: importing cbd_fast._C runs the static TORCH_LIBRARY
// registrations of every translation unit. No pybind11 (keeps the build ~5x faster).
#include <Python.h>

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                                          "cbd_fast compiled ops (see torch.ops.cbd_fast)", -1,
                                          nullptr};
  return PyModule_Create(&module_def);
}
}
