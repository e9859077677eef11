// Samplers, k-diffusion semantics: sigma space (x_t = x0 + sigma * eps, so x starts at scale
// sigmas[0]) and a denoiser D(x, sigma) -> x0. Each sampler is one function with one
// signature. Tensors are opaque: every new tensor comes from exactly one L.lincomb(...) per
// model evaluation, so derivatives such as (x - D) / sigma appear only as coefficients.
// No tensor value is ever read, so the loop adds no host synchronisation.
#include <algorithm>
#include <cmath>
#include <deque>
#include <map>

#include "core.h"

namespace fastdiff {

namespace {

using Terms = std::vector<std::pair<double, py::object>>;

// get_ancestral_step of k-diffusion: split a step sigma -> sigma_next into a deterministic part
// down to sigma_down and fresh noise of std sigma_up (sigma_down^2 + sigma_up^2 = sigma_next^2).
void ancestral(double from, double to, double eta, double& down, double& up) {
    if (eta == 0.0 || to == 0.0) {
        down = to;
        up = 0.0;
        return;
    }
    up = std::min(to, eta * std::sqrt(to * to * (from * from - to * to) / (from * from)));
    down = std::sqrt(std::max(to * to - up * up, 0.0));
}

// Euler step of the probability-flow ODE dx/dsigma = (x - D) / sigma from sigma to target.
Terms euler_terms(const py::object& x, const py::object& den, double sigma, double target) {
    const double r = target / sigma;
    return {{r, x}, {1.0 - r, den}};
}

void add_noise(const Loop& L, Terms& terms, double sigma, double sigma_next, double std_dev) {
    if (std_dev > 0.0) terms.emplace_back(L.s_noise * std_dev, L.N(sigma, sigma_next));
}

// Karras et al. (2022), Algorithm 2 without churn: Euler steps.
py::object sample_euler(const Loop& L, py::object x) {
    for (int i = 0; i < L.steps(); ++i) {
        py::object den = L.D(x, L.s[i]);
        L.report(i, x, den);
        x = L.lincomb(euler_terms(x, den, L.s[i], L.s[i + 1]));
    }
    return x;
}

// Ancestral sampling with Euler steps (k-diffusion sample_euler_ancestral).
py::object sample_euler_ancestral(const Loop& L, py::object x) {
    for (int i = 0; i < L.steps(); ++i) {
        py::object den = L.D(x, L.s[i]);
        L.report(i, x, den);
        double down, up;
        ancestral(L.s[i], L.s[i + 1], L.eta, down, up);
        Terms t = euler_terms(x, den, L.s[i], down);
        if (L.s[i + 1] > 0.0) add_noise(L, t, L.s[i], L.s[i + 1], up);
        x = L.lincomb(t);
    }
    return x;
}

// Karras et al. (2022), Algorithm 2 without churn: Heun steps, Euler on the last step to 0.
py::object sample_heun(const Loop& L, py::object x) {
    for (int i = 0; i < L.steps(); ++i) {
        const double s = L.s[i], sn = L.s[i + 1];
        py::object den = L.D(x, s);
        L.report(i, x, den);
        if (sn == 0.0) {
            x = L.lincomb(euler_terms(x, den, s, sn));
            continue;
        }
        py::object x2 = L.lincomb(euler_terms(x, den, s, sn));
        py::object den2 = L.D(x2, sn);
        // x + dt/2 * ((x - den)/s + (x2 - den2)/sn)
        const double dt = sn - s;
        x = L.lincomb({{1.0 + dt / (2 * s), x}, {-dt / (2 * s), den}, {dt / (2 * sn), x2}, {-dt / (2 * sn), den2}});
    }
    return x;
}

// One DPM-Solver-2 step to `target` with the midpoint in log sigma (k-diffusion sample_dpm_2).
Terms dpm2_step(const Loop& L, const py::object& x, const py::object& den, double s, double target) {
    const double mid = std::exp(std::log(s) + 0.5 * (std::log(target) - std::log(s)));
    py::object x2 = L.lincomb(euler_terms(x, den, s, mid));
    py::object den2 = L.D(x2, mid);
    const double c = (target - s) / mid;  // x + (x2 - den2)/mid * (target - s)
    return {{1.0, x}, {c, x2}, {-c, den2}};
}

// DPM-Solver-2 inspired second-order steps, Karras et al. (2022) (k-diffusion sample_dpm_2).
py::object sample_dpm_2(const Loop& L, py::object x) {
    for (int i = 0; i < L.steps(); ++i) {
        const double s = L.s[i], sn = L.s[i + 1];
        py::object den = L.D(x, s);
        L.report(i, x, den);
        x = L.lincomb(sn == 0.0 ? euler_terms(x, den, s, sn) : dpm2_step(L, x, den, s, sn));
    }
    return x;
}

// Ancestral sampling with DPM-Solver-2 steps (k-diffusion sample_dpm_2_ancestral).
py::object sample_dpm_2_ancestral(const Loop& L, py::object x) {
    for (int i = 0; i < L.steps(); ++i) {
        const double s = L.s[i], sn = L.s[i + 1];
        py::object den = L.D(x, s);
        L.report(i, x, den);
        double down, up;
        ancestral(s, sn, L.eta, down, up);
        Terms t = down == 0.0 ? euler_terms(x, den, s, down) : dpm2_step(L, x, den, s, down);
        add_noise(L, t, s, sn, up);
        x = L.lincomb(t);
    }
    return x;
}

// Linear multistep (Adams-Bashforth in sigma, order 4) on the ODE derivative; the coefficients
// integrate the Lagrange basis over [sigma_i, sigma_i+1] (k-diffusion sample_lms). The history
// holds (x_j, D_j) pairs, so d_j = (x_j - D_j)/sigma_j stays a coefficient: up to 8 tensors.
py::object sample_lms(const Loop& L, py::object x) {
    const int order = 4;
    std::deque<std::pair<py::object, py::object>> hist;  // newest first: (x_i, D_i), (x_i-1, D_i-1)...
    for (int i = 0; i < L.steps(); ++i) {
        py::object den = L.D(x, L.s[i]);
        L.report(i, x, den);
        hist.emplace_front(x, den);
        if (static_cast<int>(hist.size()) > order) hist.pop_back();
        const int cur = std::min(i + 1, order);
        Terms t{{1.0, x}};
        for (int j = 0; j < cur; ++j) {
            const double c = lms_coeff(cur, L.s, i, j) / L.s[i - j];
            if (j == 0) {
                t[0].first += c;
            } else {
                t.emplace_back(c, hist[j].first);
            }
            t.emplace_back(-c, hist[j].second);
        }
        x = L.lincomb(t);
    }
    return x;
}

// DPM-Solver++(2S) ancestral, Lu et al. (2022) (k-diffusion sample_dpmpp_2s_ancestral).
py::object sample_dpmpp_2s_ancestral(const Loop& L, py::object x) {
    for (int i = 0; i < L.steps(); ++i) {
        const double s = L.s[i], sn = L.s[i + 1];
        py::object den = L.D(x, s);
        L.report(i, x, den);
        double down, up;
        ancestral(s, sn, L.eta, down, up);
        Terms t;
        if (down == 0.0) {
            t = euler_terms(x, den, s, down);
        } else {
            const double h = std::log(s / down);   // lambda = -log sigma
            const double s_mid = s * std::exp(-0.5 * h);
            py::object x2 = L.lincomb({{s_mid / s, x}, {-std::expm1(-0.5 * h), den}});
            py::object den2 = L.D(x2, s_mid);
            t = {{down / s, x}, {-std::expm1(-h), den2}};
        }
        if (sn > 0.0) add_noise(L, t, s, sn, up);
        x = L.lincomb(t);
    }
    return x;
}

// DPM-Solver++ SDE, Lu et al. (2022), two stages with r = 1/2 (k-diffusion sample_dpmpp_sde).
// Default noise here is independent per call, not k-diffusion's Brownian tree.
py::object sample_dpmpp_sde(const Loop& L, py::object x) {
    const double r = 0.5;
    for (int i = 0; i < L.steps(); ++i) {
        const double s = L.s[i], sn = L.s[i + 1];
        py::object den = L.D(x, s);
        L.report(i, x, den);
        if (sn == 0.0) {
            x = L.lincomb(euler_terms(x, den, s, sn));
            continue;
        }
        const double h = std::log(s / sn);
        const double s_mid = s * std::exp(-r * h);
        double down, up;
        ancestral(s, s_mid, L.eta, down, up);
        Terms t1 = euler_terms(x, den, s, down);  // (down/s) x - expm1(log(down/s)) den
        add_noise(L, t1, s, s_mid, up);
        py::object x2 = L.lincomb(t1);
        py::object den2 = L.D(x2, s_mid);
        ancestral(s, sn, L.eta, down, up);
        const double fac = 1.0 / (2.0 * r);  // D' = (1 - fac) den + fac den2; fac = 1 for r = 1/2
        const double ratio = down / s;
        Terms t2 = {{ratio, x}, {(1.0 - ratio) * fac, den2}};
        if (fac != 1.0) t2.emplace_back((1.0 - ratio) * (1.0 - fac), den);
        add_noise(L, t2, s, sn, up);
        x = L.lincomb(t2);
    }
    return x;
}

// DPM-Solver++(2M), Lu et al. (2022), multistep (k-diffusion sample_dpmpp_2m).
py::object sample_dpmpp_2m(const Loop& L, py::object x) {
    py::object old;
    for (int i = 0; i < L.steps(); ++i) {
        const double s = L.s[i], sn = L.s[i + 1];
        py::object den = L.D(x, s);
        L.report(i, x, den);
        const double h = std::log(s / sn);  // inf when sn == 0: expm1(-h) = -1
        const double c = -std::expm1(-h);
        if (!old || sn == 0.0) {
            x = L.lincomb({{sn / s, x}, {c, den}});
        } else {
            const double rr = std::log(L.s[i - 1] / s) / h;  // h_last / h
            x = L.lincomb({{sn / s, x}, {c * (1.0 + 1.0 / (2 * rr)), den}, {-c / (2 * rr), old}});
        }
        old = den;
    }
    return x;
}

// DPM-Solver++(2M) SDE, midpoint variant (k-diffusion sample_dpmpp_2m_sde).
py::object sample_dpmpp_2m_sde(const Loop& L, py::object x) {
    py::object old;
    double h_last = 0.0;
    for (int i = 0; i < L.steps(); ++i) {
        const double s = L.s[i], sn = L.s[i + 1];
        py::object den = L.D(x, s);
        L.report(i, x, den);
        if (sn == 0.0) {
            x = L.lincomb({{1.0, den}});
        } else {
            const double h = std::log(s / sn), eta_h = L.eta * h;
            const double c = -std::expm1(-h - eta_h);
            Terms t{{sn / s * std::exp(-eta_h), x}, {c, den}};
            if (old) {
                const double k = 0.5 * c * h / h_last;  // 0.5 * c / r, r = h_last / h
                t[1].first += k;
                t.emplace_back(-k, old);
            }
            if (L.eta != 0.0) add_noise(L, t, s, sn, sn * std::sqrt(-std::expm1(-2 * eta_h)));
            x = L.lincomb(t);
            h_last = h;
        }
        old = den;
    }
    return x;
}

// DPM-Solver++(3M) SDE (k-diffusion sample_dpmpp_3m_sde).
py::object sample_dpmpp_3m_sde(const Loop& L, py::object x) {
    py::object d1, d2;  // denoised of the previous two steps
    double h1 = 0.0, h2 = 0.0;
    for (int i = 0; i < L.steps(); ++i) {
        const double s = L.s[i], sn = L.s[i + 1];
        py::object den = L.D(x, s);
        L.report(i, x, den);
        if (sn == 0.0) {
            x = L.lincomb({{1.0, den}});
        } else {
            const double h = std::log(s / sn), h_eta = h * (L.eta + 1.0);
            Terms t{{std::exp(-h_eta), x}, {-std::expm1(-h_eta), den}};
            const double phi2 = std::expm1(-h_eta) / h_eta + 1.0;
            if (d2) {
                const double r0 = h1 / h, r1 = h2 / h;
                const double phi3 = phi2 / h_eta - 0.5;
                // d1_0 = (den - d1)/r0, d1_1 = (d1 - d2)/r1,
                // x += phi2 * (d1_0 + (d1_0 - d1_1) r0/(r0+r1)) - phi3 * (d1_0 - d1_1)/(r0+r1)
                const double a = phi2 * (1.0 + r0 / (r0 + r1)) - phi3 / (r0 + r1);  // on d1_0
                const double b = -phi2 * r0 / (r0 + r1) + phi3 / (r0 + r1);         // on d1_1
                t[1].first += a / r0;
                t.emplace_back(-a / r0 + b / r1, d1);
                t.emplace_back(-b / r1, d2);
            } else if (d1) {
                const double k = phi2 / (h1 / h);
                t[1].first += k;
                t.emplace_back(-k, d1);
            }
            if (L.eta != 0.0) add_noise(L, t, s, sn, sn * std::sqrt(-std::expm1(-2 * h * L.eta)));
            x = L.lincomb(t);
            h2 = h1;
            h1 = h;
        }
        d2 = d1;
        d1 = den;
    }
    return x;
}

// DDIM, Song et al. (2021), eta = 0: in sigma space exactly the Euler step (as ComfyUI's ddim).
// DDIM with eta > 0 is euler_ancestral with that eta (same sigma_up); `eta` is not used here.
py::object sample_ddim(const Loop& L, py::object x) { return sample_euler(L, x); }

// DDPM ancestral sampling, Ho et al. (2020): the posterior q(x_t-1 | x_t, x0) with the "fixed
// small" variance, in sigma space: x' = (sn/s)^2 x + (1 - (sn/s)^2) D + sn/s sqrt(s^2 - sn^2) z.
py::object sample_ddpm(const Loop& L, py::object x) {
    for (int i = 0; i < L.steps(); ++i) {
        const double s = L.s[i], sn = L.s[i + 1];
        py::object den = L.D(x, s);
        L.report(i, x, den);
        const double q = (sn / s) * (sn / s);
        Terms t{{q, x}, {1.0 - q, den}};
        if (sn > 0.0) add_noise(L, t, s, sn, sn / s * std::sqrt(s * s - sn * sn));
        x = L.lincomb(t);
    }
    return x;
}

// Latent consistency model sampling, Luo et al. (2023): jump to D, re-noise to the next sigma.
py::object sample_lcm(const Loop& L, py::object x) {
    for (int i = 0; i < L.steps(); ++i) {
        const double s = L.s[i], sn = L.s[i + 1];
        py::object den = L.D(x, s);
        L.report(i, x, den);
        Terms t{{1.0, den}};
        if (sn > 0.0) add_noise(L, t, s, sn, sn);
        x = L.lincomb(t);
    }
    return x;
}

// Small dense solve (Gaussian elimination with partial pivoting), n <= 4.
std::vector<double> solve(std::vector<std::vector<double>> A, std::vector<double> b) {
    const int n = static_cast<int>(b.size());
    for (int c = 0; c < n; ++c) {
        int p = c;
        for (int r = c + 1; r < n; ++r)
            if (std::fabs(A[r][c]) > std::fabs(A[p][c])) p = r;
        std::swap(A[c], A[p]);
        std::swap(b[c], b[p]);
        for (int r = c + 1; r < n; ++r) {
            const double f = A[r][c] / A[c][c];
            for (int k = c; k < n; ++k) A[r][k] -= f * A[c][k];
            b[r] -= f * b[c];
        }
    }
    std::vector<double> out(n);
    for (int r = n - 1; r >= 0; --r) {
        double acc = b[r];
        for (int k = r + 1; k < n; ++k) acc -= A[r][k] * out[k];
        out[r] = acc / A[r][r];
    }
    return out;
}

// One UniPC step from sigma index `from` to `from + 1` with `order` history points, data
// prediction, B(h) = expm1(-h) (bh2) or -h (bh1). rks[i] for history point from - 1 - i; R and
// b as in Zhao et al. (2023), Algorithm 2/3.
struct UniCoeffs {
    double ratio, h_phi_1, B_h;
    std::vector<double> rks;          // order - 1 entries
    std::vector<double> rhos_p, rhos_c;
};

UniCoeffs unipc_coeffs(const std::vector<double>& s, int from, int order, bool bh2) {
    UniCoeffs u;
    const double h = std::log(s[from] / s[from + 1]);
    const double hh = -h;
    u.ratio = s[from + 1] / s[from];
    u.h_phi_1 = std::expm1(hh);
    u.B_h = bh2 ? std::expm1(hh) : hh;
    std::vector<double> rks;
    for (int i = 1; i < order; ++i) rks.push_back(std::log(s[from] / s[from - i]) / h);
    u.rks = rks;
    if (order == 1) {
        u.rhos_c = {0.5};
        return u;
    }
    rks.push_back(1.0);
    std::vector<std::vector<double>> R(order, std::vector<double>(order));
    std::vector<double> b(order);
    double h_phi_k = u.h_phi_1 / hh - 1.0, fact = 1.0;
    for (int i = 1; i <= order; ++i) {
        for (int k = 0; k < order; ++k) R[i - 1][k] = std::pow(rks[k], i - 1);
        b[i - 1] = h_phi_k * fact / u.B_h;
        fact *= i + 1;
        h_phi_k = h_phi_k / hh - 1.0 / fact;
    }
    u.rhos_c = solve(R, b);
    if (order == 2) {
        u.rhos_p = {0.5};
    } else {
        std::vector<std::vector<double>> Rp(order - 1, std::vector<double>(order - 1));
        for (int r = 0; r < order - 1; ++r)
            for (int c = 0; c < order - 1; ++c) Rp[r][c] = R[r][c];
        u.rhos_p = solve(Rp, std::vector<double>(b.begin(), b.end() - 1));
    }
    return u;
}

// UniPC, Zhao et al. (2023): multistep predictor UniP + corrector UniC (diffusers'
// UniPCMultistepScheduler: data prediction, lower-order warm-up and final steps). The corrected
// sample differs from the predicted one only by model-output terms, so each step is one
// combination of x and at most order + 1 denoised tensors.
py::object unipc(const Loop& L, py::object x, int p, bool bh2) {
    const int n = L.steps();
    std::deque<py::object> m;  // denoised, newest first
    int prev_order = 0;
    for (int k = 0; k < n; ++k) {
        py::object den = L.D(x, L.s[k]);
        L.report(k, x, den);
        m.push_front(den);
        if (static_cast<int>(m.size()) > p + 1) m.pop_back();
        std::map<int, double> cm;  // coefficient on m[j] (= denoised of step k - j)
        double cx = 1.0;
        if (k > 0) {
            // x_c = x - B_h [sum_i (rho_c - rho_p)_i (m_{k-1-i} - m_{k-1}) / rk_i + rho_c,last (m_k - m_{k-1})]
            const int o = prev_order;
            const UniCoeffs u = unipc_coeffs(L.s, k - 1, o, bh2);
            for (int i = 1; i < o; ++i) {
                const double w = -u.B_h * (u.rhos_c[i - 1] - u.rhos_p[i - 1]) / u.rks[i - 1];
                cm[1 + i] += w;
                cm[1] -= w;
            }
            const double wl = -u.B_h * u.rhos_c.back();
            cm[0] += wl;
            cm[1] -= wl;
        }
        // Predictor from the corrected sample: x' = ratio x_c - h_phi_1 m_k - B_h sum_i rho_p,i (m_{k-i} - m_k) / rk_i
        const int o = std::min({p, n - k, k + 1});
        const UniCoeffs u = unipc_coeffs(L.s, k, o, bh2);
        for (auto& kv : cm) kv.second *= u.ratio;
        cx *= u.ratio;
        cm[0] -= u.h_phi_1;
        for (int i = 1; i < o; ++i) {
            const double w = -u.B_h * u.rhos_p[i - 1] / u.rks[i - 1];
            cm[i] += w;
            cm[0] -= w;
        }
        Terms t{{cx, x}};
        for (auto& kv : cm) t.emplace_back(kv.second, m[kv.first]);
        x = L.lincomb(t);
        prev_order = o;
    }
    return x;
}

// UniPC-2 with B(h) = expm1(-h) (bh2), diffusers' defaults for SD.
py::object sample_uni_pc(const Loop& L, py::object x) { return unipc(L, x, 2, true); }

struct Entry {
    const char* name;
    SamplerFn fn;
};

const Entry kSamplers[] = {
    {"euler", sample_euler},
    {"euler_ancestral", sample_euler_ancestral},
    {"heun", sample_heun},
    {"dpm_2", sample_dpm_2},
    {"dpm_2_ancestral", sample_dpm_2_ancestral},
    {"lms", sample_lms},
    {"dpmpp_2s_ancestral", sample_dpmpp_2s_ancestral},
    {"dpmpp_sde", sample_dpmpp_sde},
    {"dpmpp_2m", sample_dpmpp_2m},
    {"dpmpp_2m_sde", sample_dpmpp_2m_sde},
    {"dpmpp_3m_sde", sample_dpmpp_3m_sde},
    {"ddim", sample_ddim},
    {"ddpm", sample_ddpm},
    {"uni_pc", sample_uni_pc},
    {"lcm", sample_lcm},
};

}  // namespace

const std::vector<std::string>& sampler_names() {
    static const std::vector<std::string> names = [] {
        std::vector<std::string> v;
        for (const auto& e : kSamplers) v.emplace_back(e.name);
        return v;
    }();
    return names;
}

SamplerFn find_sampler(const std::string& name) {
    for (const auto& e : kSamplers)
        if (name == e.name) return e.fn;
    throw py::value_error("unknown sampler '" + name + "'; valid samplers: " + join_names(sampler_names()));
}

// ---- Loop ------------------------------------------------------------------------------------

namespace {
void check_shape(const py::object& shape, const py::object& t, const char* who) {
    if (!py::hasattr(t, "shape"))
        throw py::value_error(std::string(who) + " must return a tensor, got " + std::string(py::str(py::type::of(t))));
    py::object got = t.attr("shape");
    if (!got.equal(shape))
        throw py::value_error(std::string(who) + " returned shape " + std::string(py::str(got)) +
                              ", expected the shape of x " + std::string(py::str(shape)));
}
}  // namespace

py::object Loop::D(const py::object& x, double sigma) const {
    py::object out = denoise(x, sigma);
    check_shape(shape, out, "denoise");
    return out;
}

py::object Loop::N(double sigma, double sigma_next) const {
    py::object out = noise(sigma, sigma_next);
    check_shape(shape, out, "noise_sampler");
    return out;
}

py::object Loop::lincomb(const Terms& terms) const {
    py::list coeffs, tensors;
    for (const auto& t : terms) {
        coeffs.append(t.first);
        tensors.append(t.second);
    }
    py::object out = update(coeffs, tensors);
    check_shape(shape, out, "update");
    return out;
}

void Loop::report(int i, const py::object& x, const py::object& denoised) const {
    if (callback.is_none()) return;
    py::dict info;
    info["i"] = i;
    info["x"] = x;
    info["sigma"] = s[i];
    info["denoised"] = denoised;
    callback(info);
}

}  // namespace fastdiff
