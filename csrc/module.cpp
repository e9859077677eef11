// fastdiff._core: schedules, samplers and the sampling loop. Links against Python only.
#include <pybind11/pybind11.h>

namespace py = pybind11;

PYBIND11_MODULE(_core, m) {
    m.doc() = "fastdiff C++ core: noise schedules, samplers and the sampling loop";
    m.attr("__version__") = "0.1.0";
}
