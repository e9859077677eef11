// fastdiff._core: schedules, samplers and the sampling loop. Links against Python only.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>

#include "core.h"

namespace py = pybind11;
using namespace fastdiff;

namespace {

std::vector<double> check_sigmas(const std::vector<double>& s) {
    if (s.size() < 2)
        throw py::value_error("sigmas needs at least 2 entries (one step), got " + std::to_string(s.size()));
    for (size_t i = 0; i < s.size(); ++i) {
        if (!std::isfinite(s[i]) || s[i] < 0.0)
            throw py::value_error("sigmas must be finite and >= 0; sigmas[" + std::to_string(i) + "] = " +
                                  std::to_string(s[i]));
        if (i && !(s[i] < s[i - 1]))
            throw py::value_error("sigmas must be strictly decreasing; sigmas[" + std::to_string(i) + "] = " +
                                  std::to_string(s[i]) + " >= sigmas[" + std::to_string(i - 1) + "] = " +
                                  std::to_string(s[i - 1]));
    }
    return s;
}

py::object run(const std::string& sampler, py::object denoise, py::object x, const std::vector<double>& sigmas,
               py::object noise, py::object update, py::object callback, double eta, double s_noise) {
    SamplerFn fn = find_sampler(sampler);
    Loop L;
    L.s = check_sigmas(sigmas);
    if (!std::isfinite(eta) || eta < 0.0) throw py::value_error("eta must be finite and >= 0");
    if (!std::isfinite(s_noise)) throw py::value_error("s_noise must be finite");
    if (!py::hasattr(x, "shape")) throw py::value_error("x must be a tensor");
    L.denoise = std::move(denoise);
    L.noise = std::move(noise);
    L.update = std::move(update);
    L.callback = std::move(callback);
    L.eta = eta;
    L.s_noise = s_noise;
    L.shape = x.attr("shape");
    return fn(L, std::move(x));
}

std::vector<double> sigmas(const std::string& schedule, int steps, py::object alphas_cumprod, double sigma_min,
                           double sigma_max, double rho) {
    const std::vector<double> ac =
        alphas_cumprod.is_none() ? default_alphas_cumprod() : alphas_cumprod.cast<std::vector<double>>();
    return make_sigmas(schedule, steps, ac, sigma_min, sigma_max, rho);
}

}  // namespace

PYBIND11_MODULE(_core, m) {
    m.doc() = "fastdiff C++ core: noise schedules, samplers and the sampling loop";
    m.attr("__version__") = "0.1.0";
    m.attr("SAMPLERS") = py::tuple(py::cast(sampler_names()));
    m.attr("SCHEDULES") = py::tuple(py::cast(schedule_names()));
    m.def("sample", &run, py::arg("sampler"), py::arg("denoise"), py::arg("x"), py::arg("sigmas"),
          py::arg("noise"), py::arg("update"), py::arg("callback"), py::arg("eta"), py::arg("s_noise"),
          "Run `sampler` over `sigmas` (floats). Tensors are only handed to the callables.");
    m.def("sigmas", &sigmas, py::arg("schedule"), py::arg("steps"), py::arg("alphas_cumprod"),
          py::arg("sigma_min"), py::arg("sigma_max"), py::arg("rho"),
          "steps + 1 sigmas (floats); sigma_min/sigma_max <= 0 mean the model's.");
    m.def("default_alphas_cumprod", &default_alphas_cumprod);
    m.def("alphas_cumprod", &alphas_cumprod, py::arg("beta_schedule"), py::arg("beta_start"), py::arg("beta_end"),
          py::arg("n"), py::arg("trained_betas"),
          "cumprod(1 - beta) for a diffusers beta schedule, or of trained_betas when not empty.");
    py::class_<ModelSchedule>(m, "ModelSchedule", "A model's training sigmas and the sigma <-> timestep map.")
        .def(py::init<const std::vector<double>&>(), py::arg("alphas_cumprod"))
        .def("sigma_to_t", &ModelSchedule::sigma_to_t, py::arg("sigma"))
        .def("t_to_sigma", &ModelSchedule::t_to_sigma, py::arg("t"))
        .def_property_readonly("sigma_min", [](const ModelSchedule& s) { return s.sigmas.front(); })
        .def_property_readonly("sigma_max", [](const ModelSchedule& s) { return s.sigmas.back(); })
        .def_readonly("sigmas", &ModelSchedule::sigmas);
    m.def("model_sigmas", &model_sigmas, py::arg("alphas_cumprod"));
    m.def("beta_ppf", &beta_ppf, py::arg("q"), py::arg("a"), py::arg("b"));
    m.def("lms_coeff", &lms_coeff, py::arg("order"), py::arg("t"), py::arg("i"), py::arg("j"));
}
