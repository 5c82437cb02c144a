// alto_ext._C: importing it loads this library, so the static TORCH_LIBRARY registrations run
// (the ops live under torch.ops.alto). It also exposes the CUDA index-error controls, and the
// shrink's K split: its switch and which path a shape takes (tests, benches).
#include <Python.h>

#include <c10/util/Exception.h>

#if ALTO_WITH_CUDA
#include "cuda/device_errors.h"
#include "cuda/lora_kernels.h"
#endif

namespace {

// Runs fn, turning a c10 error into the matching Python exception.
template <class Fn>
PyObject* call_translated(Fn&& fn) {
  try {
    fn();
  } catch (const c10::ValueError& e) {
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    return nullptr;
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
  Py_RETURN_NONE;
}

PyObject* check_errors(PyObject*, PyObject*) {
#if ALTO_WITH_CUDA
  return call_translated([] { alto::check_device_errors(); });
#else
  Py_RETURN_NONE;
#endif
}

PyObject* set_sync_checks(PyObject*, PyObject* arg) {
  const int enabled = PyObject_IsTrue(arg);
  if (enabled < 0) return nullptr;
#if ALTO_WITH_CUDA
  alto::set_sync_checks(enabled != 0);
#endif
  Py_RETURN_NONE;
}

PyObject* sync_checks(PyObject*, PyObject*) {
#if ALTO_WITH_CUDA
  return PyBool_FromLong(alto::sync_checks());
#else
  Py_RETURN_FALSE;
#endif
}

PyObject* set_split_k(PyObject*, PyObject* arg) {
  const int enabled = PyObject_IsTrue(arg);
  if (enabled < 0) return nullptr;
#if ALTO_WITH_CUDA
  const bool was = alto::cuda::split_k();
  alto::cuda::set_split_k(enabled != 0);
  return PyBool_FromLong(was);
#else
  Py_RETURN_FALSE;
#endif
}

PyObject* shrink_splits(PyObject*, PyObject* args) {
  long long tokens, out_ld, d;
  int groups, sm_count;
  if (!PyArg_ParseTuple(args, "LiLLi", &tokens, &groups, &out_ld, &d, &sm_count)) return nullptr;
#if ALTO_WITH_CUDA
  return PyLong_FromLong(alto::cuda::shrink_splits(tokens, groups, out_ld, d, sm_count));
#else
  return PyLong_FromLong(1);
#endif
}

PyMethodDef methods[] = {
    {"check_errors", check_errors, METH_NOARGS,
     "Synchronize and raise ValueError for an index error found by an earlier CUDA op."},
    {"set_sync_checks", set_sync_checks, METH_O,
     "Synchronize after every CUDA op so index errors are raised by the op that hit them."},
    {"sync_checks", sync_checks, METH_NOARGS, "Whether every CUDA op synchronizes after its launch."},
    {"set_split_k", set_split_k, METH_O,
     "Whether a CUDA shrink of few tokens may split its K (ALTO_SPLIT_K=0 at start: no); returns the old setting."},
    {"shrink_splits", shrink_splits, METH_VARARGS,
     "shrink_splits(tokens, groups, out_ld, d, sm_count): the K chunks a CUDA shrink of that shape runs in."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef alto_module = {PyModuleDef_HEAD_INIT, "_C",
                           "ALTO op library; ops live under torch.ops.alto", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C() {
  PyObject* m = PyModule_Create(&alto_module);
  if (m != nullptr && PyModule_AddIntConstant(m, "with_cuda", ALTO_WITH_CUDA) != 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
