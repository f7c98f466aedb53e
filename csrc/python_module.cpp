// The Python module selfattn._C. `import selfattn._C` loads this library, and loading it runs the
// op registrations (selfattn.cpp); every op is reached through torch.ops.selfattn.
//
// One function is also exposed to Python directly: attention_eager(q, k, v, causal, scale), the
// private op _attention_eager (eager.cpp) without mask, window or dropout, the plain small call
// of selfattn.attention in eager mode. Through torch.ops its arguments are converted generically,
// by the schema and boxed: at (1, 1, 1, 64) that took ~8 of a 13 µs call (perf: libpython and
// libtorch_python 65 %), against a direct call of the same op through the dispatcher, unboxed.
// Returns NotImplemented, and the caller takes torch.ops, for anything but plain torch.Tensor
// arguments, a Python bool and float, and no __torch_function__ mode, which only torch.ops honours.
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <optional>

namespace {

using EagerOp = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, bool, double,
                           const std::optional<at::Tensor>&, int64_t, int64_t, int64_t, double,
                           const std::optional<at::Tensor>&);

// The GIL is let go while the op runs (as torch's own bindings do), and taken back on every
// way out, an exception included.
class WithoutGil {
 public:
  WithoutGil() : state_(PyEval_SaveThread()) {}
  ~WithoutGil() { PyEval_RestoreThread(state_); }
  WithoutGil(const WithoutGil&) = delete;
  WithoutGil& operator=(const WithoutGil&) = delete;

 private:
  PyThreadState* state_;
};

PyObject* attention_eager(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 5 || !THPVariable_CheckExact(args[0]) || !THPVariable_CheckExact(args[1]) ||
      !THPVariable_CheckExact(args[2]) || !PyBool_Check(args[3]) || !PyFloat_CheckExact(args[4]) ||
      at::impl::torch_function_mode_enabled()) {
    Py_RETURN_NOTIMPLEMENTED;
  }
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("selfattn::_attention_eager", "").typed<EagerOp>();
  const at::Tensor& q = THPVariable_Unpack(args[0]);
  const at::Tensor& k = THPVariable_Unpack(args[1]);
  const at::Tensor& v = THPVariable_Unpack(args[2]);
  const bool causal = args[3] == Py_True;
  const double scale = PyFloat_AS_DOUBLE(args[4]);
  at::Tensor out;
  {
    WithoutGil without_gil;
    out = op.call(q, k, v, causal, scale, std::nullopt, -1, -1, 0, 0.0, std::nullopt);
  }
  return THPVariable_Wrap(std::move(out));
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"attention_eager", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(attention_eager)),
     METH_FASTCALL, "attention_eager(q, k, v, causal, scale): _attention_eager's plain call (python_module.cpp)"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
