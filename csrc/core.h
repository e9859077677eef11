// Shared declarations of the sampling core: schedules (pure maths on doubles) and the sampling
// loop, which sees tensors only as Python objects handed to callbacks.
#pragma once

#include <pybind11/pybind11.h>

#include <string>
#include <utility>
#include <vector>

namespace fastdiff {

namespace py = pybind11;

// ---- schedules (schedules.cpp) -------------------------------------------------------------

// A training schedule as diffusers' scheduler configs give it: cumprod(1 - beta) of `n` betas
// ("scaled_linear": linear in sqrt(beta); "linear"), or of `trained_betas` when not empty.
std::vector<double> alphas_cumprod(const std::string& beta_schedule, double beta_start, double beta_end, int n,
                                   const std::vector<double>& trained_betas);

// SD's training schedule: scaled_linear betas 0.00085 -> 0.012 over 1000 steps, cumulative product.
std::vector<double> default_alphas_cumprod();

// A model's discrete training sigmas and the log-linear map between sigma and timestep that the
// denoiser uses to feed the UNet its (fractional) timestep.
struct ModelSchedule {
    explicit ModelSchedule(const std::vector<double>& alphas_cumprod);
    double sigma_to_t(double sigma) const;
    double t_to_sigma(double t) const;
    std::vector<double> sigmas;      // increasing with t
    std::vector<double> log_sigmas;
};

// sigma_i = sqrt((1 - a_i) / a_i), increasing with the training timestep i.
std::vector<double> model_sigmas(const std::vector<double>& alphas_cumprod);

// `steps` + 1 decreasing sigmas ending in 0 (`beta` may merge equal timesteps: fewer then).
// sigma_min / sigma_max <= 0 mean "the model's".
std::vector<double> make_sigmas(const std::string& schedule, int steps,
                                const std::vector<double>& alphas_cumprod, double sigma_min,
                                double sigma_max, double rho);

const std::vector<std::string>& schedule_names();

// Inverse CDF of the Beta(a, b) distribution (the `beta` schedule).
double beta_ppf(double q, double a, double b);

// Integral over [t[i], t[i+1]] of the Lagrange basis polynomial j built on t[i], ..., t[i-order+1].
double lms_coeff(int order, const std::vector<double>& t, int i, int j);

// ---- sampling loop (samplers.cpp) ----------------------------------------------------------

// Everything a sampler touches. Tensors are opaque py::objects; the loop only reads their
// `.shape` (host metadata) to check callbacks, never their values.
struct Loop {
    py::object denoise;   // denoise(x, sigma: float) -> x0
    py::object update;    // update(coeffs: list[float], tensors: list) -> sum c_i t_i
    py::object noise;     // noise(sigma: float, sigma_next: float) -> standard normal tensor
    py::object callback;  // None or callback({i, x, sigma, denoised})
    std::vector<double> s;  // sigmas, strictly decreasing, s.back() >= 0
    double eta = 1.0;
    double s_noise = 1.0;
    py::object shape;     // x.shape, to check what callbacks return

    int steps() const { return static_cast<int>(s.size()) - 1; }
    py::object D(const py::object& x, double sigma) const;
    py::object N(double sigma, double sigma_next) const;
    py::object lincomb(const std::vector<std::pair<double, py::object>>& terms) const;
    void report(int i, const py::object& x, const py::object& denoised) const;
};

using SamplerFn = py::object (*)(const Loop&, py::object x);

SamplerFn find_sampler(const std::string& name);  // throws py::value_error listing the names
const std::vector<std::string>& sampler_names();

std::string join_names(const std::vector<std::string>& names);

}  // namespace fastdiff
