// The Python module anllm_ext._C. Importing it loads this library, whose static initialisers register
// the torch.ops.anllm operators; the module itself has no Python functions. (Kept apart from ops.cpp so
// the C++ benchmarks link the kernels without Python.)
#include <Python.h>

#ifndef ANLLM_TORCH_VERSION
#define ANLLM_TORCH_VERSION "unknown"
#endif

PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  // The torch this extension was compiled against: anllm_ext warns when another one imports it.
  if (module != nullptr && PyModule_AddStringConstant(module, "torch_version", ANLLM_TORCH_VERSION) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  // Whether the kernels were compiled with OpenMP: without it ATen's parallel_for runs serially here.
#ifdef _OPENMP
  const long with_openmp = 1;
#else
  const long with_openmp = 0;
#endif
  if (module != nullptr && PyModule_AddIntConstant(module, "with_openmp", with_openmp) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
