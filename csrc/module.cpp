// The Python module anllm_ext._C. Importing it loads this library, whose static initialisers register
// the torch.ops.anllm operators; the module itself has no Python functions. (Kept apart from ops.cpp so
// the C++ benchmarks link the kernels without Python.)
#include <Python.h>

PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
