// Noise schedules: sigmas for a number of steps, as ComfyUI / A1111 define them.
// All maths in double; the training sigmas come from alphas_cumprod (SD's by default).
#include <algorithm>
#include <cmath>
#include <limits>
#include <sstream>

#include "core.h"

namespace fastdiff {

namespace {

const std::vector<std::string> kSchedules = {"normal",      "karras", "exponential", "sgm_uniform",
                                             "simple",      "ddim_uniform", "beta"};

// torch.linspace-like: n points from a to b inclusive (n == 1 gives {a}).
std::vector<double> linspace(double a, double b, int n) {
    std::vector<double> out(n);
    for (int i = 0; i < n; ++i) out[i] = n == 1 ? a : a + (b - a) * (static_cast<double>(i) / (n - 1));
    if (n > 1) out[n - 1] = b;
    return out;
}

// The model's sigma at a fractional training timestep: log-linear between integer timesteps
// (k-diffusion DiscreteSchedule.t_to_sigma, ComfyUI ModelSamplingDiscrete.sigma).
double sigma_at(const std::vector<double>& log_sigmas, double t) {
    const double tmax = static_cast<double>(log_sigmas.size() - 1);
    t = std::clamp(t, 0.0, tmax);
    const int lo = static_cast<int>(std::floor(t));
    const int hi = static_cast<int>(std::ceil(t));
    const double w = t - lo;
    return std::exp((1.0 - w) * log_sigmas[lo] + w * log_sigmas[hi]);
}

// The fractional training timestep of a sigma, inverse of sigma_at (k-diffusion sigma_to_t).
double t_at(const std::vector<double>& log_sigmas, double sigma) {
    const double ls = std::log(sigma);
    const int n = static_cast<int>(log_sigmas.size());
    if (ls <= log_sigmas.front()) return 0.0;
    if (ls >= log_sigmas.back()) return n - 1.0;
    const int hi = static_cast<int>(std::upper_bound(log_sigmas.begin(), log_sigmas.end(), ls) - log_sigmas.begin());
    const int lo = hi - 1;
    const double w = (ls - log_sigmas[lo]) / (log_sigmas[hi] - log_sigmas[lo]);
    return lo + w;
}

// Regularised incomplete beta I_x(a, b): continued fraction (modified Lentz), which converges
// fast for x < (a + 1) / (a + b + 2); the other side uses I_x(a, b) = 1 - I_{1-x}(b, a).
double betainc(double x, double a, double b) {
    if (x <= 0.0) return 0.0;
    if (x >= 1.0) return 1.0;
    if (x > (a + 1.0) / (a + b + 2.0)) return 1.0 - betainc(1.0 - x, b, a);
    const double tiny = 1e-300;
    const double log_front = a * std::log(x) + b * std::log1p(-x) - (std::lgamma(a) + std::lgamma(b) - std::lgamma(a + b));
    double f = tiny, C = f, D = 0.0;
    for (int j = 1; j < 10000; ++j) {
        double num;
        if (j == 1) {
            num = 1.0;
        } else {
            const int k = j - 1;
            if (k % 2 == 1) {
                const double m = (k - 1) / 2;
                num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1));
            } else {
                const double m = k / 2;
                num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m));
            }
        }
        D = 1.0 + num * D;
        if (std::fabs(D) < tiny) D = tiny;
        C = 1.0 + num / C;
        if (std::fabs(C) < tiny) C = tiny;
        D = 1.0 / D;
        const double delta = C * D;
        f *= delta;
        if (std::fabs(delta - 1.0) < 1e-16) break;
    }
    return std::exp(log_front) * f / a;
}

[[noreturn]] void bad(const std::string& msg) { throw py::value_error(msg); }

}  // namespace

std::string join_names(const std::vector<std::string>& names) {
    std::ostringstream os;
    for (size_t i = 0; i < names.size(); ++i) os << (i ? ", " : "") << names[i];
    return os.str();
}

const std::vector<std::string>& schedule_names() { return kSchedules; }

std::vector<double> alphas_cumprod(const std::string& beta_schedule, double beta_start, double beta_end, int n,
                                   const std::vector<double>& trained_betas) {
    std::vector<double> betas;
    if (!trained_betas.empty()) {
        betas = trained_betas;
    } else if (n < 2) {
        bad("num_train_timesteps must be at least 2, got " + std::to_string(n));
    } else if (beta_schedule == "scaled_linear") {  // linear in sqrt(beta)
        betas = linspace(std::sqrt(beta_start), std::sqrt(beta_end), n);
        for (double& b : betas) b *= b;
    } else if (beta_schedule == "linear") {
        betas = linspace(beta_start, beta_end, n);
    } else {
        bad("beta_schedule '" + beta_schedule + "' is not supported (scaled_linear, linear)");
    }
    std::vector<double> out(betas.size());
    double prod = 1.0;
    for (size_t i = 0; i < betas.size(); ++i) {
        if (!(betas[i] > 0.0 && betas[i] < 1.0)) bad("betas must lie strictly between 0 and 1");
        prod *= 1.0 - betas[i];
        out[i] = prod;
    }
    return out;
}

std::vector<double> default_alphas_cumprod() { return alphas_cumprod("scaled_linear", 0.00085, 0.012, 1000, {}); }

ModelSchedule::ModelSchedule(const std::vector<double>& ac) : sigmas(model_sigmas(ac)) {
    log_sigmas.reserve(sigmas.size());
    for (double s : sigmas) log_sigmas.push_back(std::log(s));
}

double ModelSchedule::sigma_to_t(double sigma) const { return t_at(log_sigmas, sigma); }

double ModelSchedule::t_to_sigma(double t) const { return sigma_at(log_sigmas, t); }

std::vector<double> model_sigmas(const std::vector<double>& ac) {
    if (ac.size() < 2) bad("alphas_cumprod needs at least 2 entries");
    std::vector<double> out(ac.size());
    for (size_t i = 0; i < ac.size(); ++i) {
        if (!(ac[i] > 0.0 && ac[i] < 1.0)) bad("alphas_cumprod must lie strictly between 0 and 1");
        if (i && !(ac[i] < ac[i - 1])) bad("alphas_cumprod must be strictly decreasing");
        out[i] = std::sqrt((1.0 - ac[i]) / ac[i]);
    }
    return out;
}

double beta_ppf(double q, double a, double b) {
    if (q <= 0.0) return 0.0;
    if (q >= 1.0) return 1.0;
    // near 1 the CDF has no resolution left: invert the mirrored distribution instead
    if (q > 0.5) return 1.0 - beta_ppf(1.0 - q, b, a);
    double lo = 0.0, hi = 1.0;
    for (int it = 0; it < 200 && hi - lo > 0.0; ++it) {
        const double mid = 0.5 * (lo + hi);
        if (mid <= lo || mid >= hi) break;
        (betainc(mid, a, b) < q ? lo : hi) = mid;
    }
    return 0.5 * (lo + hi);
}

double lms_coeff(int order, const std::vector<double>& t, int i, int j) {
    if (order < 1 || order > 4 || j < 0 || j >= order || i - order + 1 < 0 || i + 1 >= static_cast<int>(t.size()))
        bad("lms_coeff: order must be 1..4, j < order, and t must hold t[i-order+1] .. t[i+1]");
    // Lagrange basis of degree <= 3: 4-point Gauss-Legendre is exact for it (degree <= 7).
    const double u = std::sqrt(3.0 / 7.0 - 2.0 / 7.0 * std::sqrt(6.0 / 5.0));
    const double v = std::sqrt(3.0 / 7.0 + 2.0 / 7.0 * std::sqrt(6.0 / 5.0));
    const double wu = (18.0 + std::sqrt(30.0)) / 36.0, wv = (18.0 - std::sqrt(30.0)) / 36.0;
    const double nodes[4] = {-v, -u, u, v};
    const double weights[4] = {wv, wu, wu, wv};
    const double a = t[i], b = t[i + 1];
    const double half = 0.5 * (b - a), mid = 0.5 * (a + b);
    double total = 0.0;
    for (int q = 0; q < 4; ++q) {
        const double tau = mid + half * nodes[q];
        double prod = 1.0;
        for (int k = 0; k < order; ++k) {
            if (k == j) continue;
            prod *= (tau - t[i - k]) / (t[i - j] - t[i - k]);
        }
        total += weights[q] * prod;
    }
    return half * total;
}

std::vector<double> make_sigmas(const std::string& schedule, int steps, const std::vector<double>& ac,
                                double sigma_min, double sigma_max, double rho) {
    if (std::find(kSchedules.begin(), kSchedules.end(), schedule) == kSchedules.end())
        bad("unknown schedule '" + schedule + "'; valid schedules: " + join_names(kSchedules));
    if (steps < 1) bad("steps must be >= 1, got " + std::to_string(steps));
    const std::vector<double> ms = model_sigmas(ac);
    const int n = static_cast<int>(ms.size());
    std::vector<double> log_ms(n);
    for (int i = 0; i < n; ++i) log_ms[i] = std::log(ms[i]);

    const bool custom_range = sigma_min > 0.0 || sigma_max > 0.0;
    const bool discrete = schedule == "simple" || schedule == "ddim_uniform" || schedule == "beta";
    if (custom_range && discrete)
        bad("schedule '" + schedule + "' picks the model's training sigmas; it takes no sigma_min/sigma_max");
    const double smin = sigma_min > 0.0 ? sigma_min : ms.front();
    const double smax = sigma_max > 0.0 ? sigma_max : ms.back();
    if (!(std::isfinite(smin) && std::isfinite(smax) && smin < smax))
        bad("need 0 < sigma_min < sigma_max, both finite");
    if (schedule == "karras" && !(rho > 0.0 && std::isfinite(rho))) bad("rho must be a positive number");

    std::vector<double> out;
    out.reserve(steps + 1);
    if (schedule == "normal" || schedule == "sgm_uniform") {
        // Uniform in training time between the timesteps of sigma_max and sigma_min;
        // sgm_uniform spaces steps + 1 points and drops the last (SGM / ComfyUI).
        const double t0 = t_at(log_ms, smax), t1 = t_at(log_ms, smin);
        const bool sgm = schedule == "sgm_uniform";
        std::vector<double> ts = linspace(t0, t1, sgm ? steps + 1 : steps);
        if (sgm) ts.pop_back();
        for (double t : ts) out.push_back(sigma_at(log_ms, t));
    } else if (schedule == "karras") {
        // Karras et al. (2022), eq. 5: uniform in sigma^(1/rho).
        const double lo = std::pow(smin, 1.0 / rho), hi = std::pow(smax, 1.0 / rho);
        for (double r : linspace(0.0, 1.0, steps)) out.push_back(std::pow(hi + r * (lo - hi), rho));
    } else if (schedule == "exponential") {
        for (double l : linspace(std::log(smax), std::log(smin), steps)) out.push_back(std::exp(l));
    } else if (schedule == "simple") {
        // ComfyUI: every (n / steps)-th training sigma counting down from the last.
        const double stride = static_cast<double>(n) / steps;
        for (int k = 0; k < steps; ++k) {
            const int idx = n - 1 - static_cast<int>(k * stride);
            if (idx < 0) bad("schedule 'simple' needs steps <= " + std::to_string(n));
            out.push_back(ms[idx]);
        }
    } else if (schedule == "ddim_uniform") {
        // Timesteps 1 + k * (n // steps), k < steps (DDIM "uniform", diffusers' leading spacing
        // with steps_offset 1). ComfyUI keeps going while the timestep is < n, which can give
        // more than `steps` steps; we stop at `steps`.
        if (steps > n - 1) bad("schedule 'ddim_uniform' needs steps <= " + std::to_string(n - 1));
        const int stride = n / steps;
        for (int k = steps - 1; k >= 0; --k) out.push_back(ms[1 + k * stride]);
    } else {  // beta
        // ComfyUI's beta scheduler (Lee et al. 2024, "Beta sampling is all you need"):
        // timesteps at the Beta(0.6, 0.6) quantiles 1 - k/steps, rounded; repeats are merged.
        const double a = 0.6, b = 0.6;
        double last = -1.0;
        for (int k = 0; k < steps; ++k) {
            const double q = 1.0 - static_cast<double>(k) / steps;
            const double t = std::nearbyint(beta_ppf(q, a, b) * (n - 1));
            if (t != last) out.push_back(ms[static_cast<int>(t)]);
            last = t;
        }
    }
    out.push_back(0.0);
    return out;
}

}  // namespace fastdiff
