// The Python module selfattn._C. `import selfattn._C` loads this library, and loading it runs the
// op registrations (selfattn.cpp); every op is reached through torch.ops.selfattn.
//
// One function is also exposed to Python directly: attention_eager(q, k, v, causal, scale, ...),
// attention_fwd's arguments by position (those not given at their defaults), which returns
// attention_fwd's out with the C++ autograd of eager.cpp: the plain-eager call of
// selfattn.attention. Through torch.ops its arguments would be converted generically, by the
// schema, from Python: at (1, 1, 1, 64) that took ~8 of a 13 µs call (perf: libpython and
// libtorch_python 65 %). Here each argument is converted by its schema type (Tensor, Tensor?,
// bool, int, float) straight onto a stack. Returns
// NotImplemented, and the caller takes torch.ops, for anything else: a tensor subclass, a Python
// value of another type (an int for a float), or an active __torch_function__ mode, which only
// torch.ops honours.
#include <ATen/PythonTorchFunctionTLS.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <vector>

#include "eager.h"

namespace {

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

// The Python values the direct call converts, by schema type.
enum class Kind { kTensor, kOptionalTensor, kBool, kInt, kFloat, kOther };

Kind kind_of(const c10::TypePtr& type) {
  switch (type->kind()) {
    case c10::TypeKind::TensorType:
      return Kind::kTensor;
    case c10::TypeKind::OptionalType:
      return type->castRaw<c10::OptionalType>()->getElementType()->kind() == c10::TypeKind::TensorType
                 ? Kind::kOptionalTensor
                 : Kind::kOther;
    case c10::TypeKind::BoolType:
      return Kind::kBool;
    case c10::TypeKind::IntType:
      return Kind::kInt;
    case c10::TypeKind::FloatType:
      return Kind::kFloat;
    default:
      return Kind::kOther;
  }
}

// attention_eager's arguments: their kinds, the defaults of the trailing ones, how many are required.
struct Parameters {
  std::vector<Kind> kinds;
  std::vector<c10::IValue> defaults;  // (None where there is none)
  size_t required = 0;

  Parameters() {
    for (const c10::Argument& argument : selfattn::attention_eager_schema().arguments()) {
      kinds.push_back(kind_of(argument.type()));
      defaults.push_back(argument.default_value().value_or(c10::IValue()));
      required = argument.default_value().has_value() ? required : kinds.size();
    }
  }
};

// `object` onto `stack` as a value of kind `kind`; false if it is not one (plainly).
bool push_converted(PyObject* object, Kind kind, torch::jit::Stack& stack) {
  switch (kind) {
    case Kind::kOptionalTensor:
      if (object == Py_None) {
        stack.emplace_back();
        return true;
      }
      [[fallthrough]];
    case Kind::kTensor:
      if (!THPVariable_CheckExact(object)) {
        return false;
      }
      stack.emplace_back(THPVariable_Unpack(object));
      return true;
    case Kind::kBool:
      if (!PyBool_Check(object)) {
        return false;
      }
      stack.emplace_back(object == Py_True);
      return true;
    case Kind::kInt: {
      if (!PyLong_CheckExact(object)) {  // (not a bool)
        return false;
      }
      int overflow = 0;
      const long long value = PyLong_AsLongLongAndOverflow(object, &overflow);
      if (overflow != 0) {
        return false;
      }
      stack.emplace_back(static_cast<int64_t>(value));
      return true;
    }
    case Kind::kFloat:
      if (!PyFloat_CheckExact(object)) {
        return false;
      }
      stack.emplace_back(PyFloat_AS_DOUBLE(object));
      return true;
    case Kind::kOther:
      return false;
  }
  return false;
}

PyObject* attention_eager(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  static const Parameters parameters;
  const size_t count = static_cast<size_t>(nargs);
  if (count < parameters.required || count > parameters.kinds.size() || at::impl::torch_function_mode_enabled()) {
    Py_RETURN_NOTIMPLEMENTED;
  }
  torch::jit::Stack stack;
  stack.reserve(parameters.kinds.size());
  for (size_t i = 0; i < count; ++i) {
    if (!push_converted(args[i], parameters.kinds[i], stack)) {
      Py_RETURN_NOTIMPLEMENTED;
    }
  }
  stack.insert(stack.end(), parameters.defaults.begin() + count, parameters.defaults.end());
  at::Tensor out;
  {
    WithoutGil without_gil;
    out = selfattn::attention_eager(std::move(stack));
  }
  return THPVariable_Wrap(std::move(out));
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"attention_eager", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(attention_eager)), METH_FASTCALL,
     "attention_eager(q, k, v, causal, scale, ...): attention_fwd's out for its arguments by position, with the C++ "
     "autograd (python_module.cpp)"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
