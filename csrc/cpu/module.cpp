// The Python module ivl._C. It exposes nothing itself: importing it loads this shared object,
// whose static TORCH_LIBRARY blocks register the ops as torch.ops.ivl.*. Import torch first so
// libtorch's symbols are already loaded.
#include <Python.h>

static PyModuleDef ivl_c_module = {
    PyModuleDef_HEAD_INIT, "_C", "Native ivl ops, registered as torch.ops.ivl.*", -1, nullptr,
};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&ivl_c_module); }
