// The Python module anllm_ext._C. Importing it loads this library, whose static initialisers register
// the torch.ops.anllm operators; the module's own functions say which CPU kernel variant runs and how
// the CPU backward splits its work. (Kept apart from ops.cpp so the C++ benchmarks link the kernels
// without Python.)
#include <Python.h>

#include <c10/util/Exception.h>

#include "cpu/dispatch.h"

#ifndef ANLLM_TORCH_VERSION
#define ANLLM_TORCH_VERSION "unknown"
#endif

namespace {

// Runs fn, turning a C++ exception into a Python RuntimeError with the message (no C++ backtrace).
template <typename Fn>
PyObject* translate_errors(Fn&& fn) {
  try {
    return fn();
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  }
  return nullptr;
}

PyObject* cpu_capability(PyObject*, PyObject*) {
  return translate_errors([] { return PyUnicode_FromString(anllm::cpu_capability()); });
}

PyObject* built_cpu_capabilities(PyObject*, PyObject*) {
  return translate_errors([] {
    const auto names = anllm::built_cpu_capabilities();
    PyObject* tuple = PyTuple_New(names.size());
    for (size_t i = 0; tuple != nullptr && i < names.size(); ++i)
      PyTuple_SET_ITEM(tuple, i, PyUnicode_FromString(names[i].c_str()));
    return tuple;
  });
}

PyObject* cpu_backward_plan(PyObject*, PyObject* args) {
  long long B, Hkv, Tq, Tk, D, threads;
  if (!PyArg_ParseTuple(args, "LLLLLL", &B, &Hkv, &Tq, &Tk, &D, &threads)) return nullptr;
  return translate_errors([&] {
    const anllm::CpuBackwardPlan plan = anllm::plan_cpu_backward(B, Hkv, Tq, Tk, D, threads);
    return Py_BuildValue("(LL)", static_cast<long long>(plan.splits), static_cast<long long>(plan.scratch_bytes));
  });
}

PyMethodDef methods[] = {
    {"cpu_capability", cpu_capability, METH_NOARGS,
     "The CPU kernel variant the ops run: 'default', 'avx2' or 'avx512' (ANLLM_CPU_CAPABILITY caps it)."},
    {"built_cpu_capabilities", built_cpu_capabilities, METH_NOARGS,
     "The CPU kernel variants compiled into this build, baseline first."},
    {"cpu_backward_plan", cpu_backward_plan, METH_VARARGS,
     "cpu_backward_plan(B, Hkv, Tq, Tk, D, threads) -> (splits, scratch_bytes) of the CPU backward's "
     "dk/dv partials (bounded by ANLLM_CPU_BWD_SCRATCH_MB, default 512)."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
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
