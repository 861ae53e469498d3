"""The Gaussian diffusion of MAR's per-token head: IDDPM (Nichol & Dhariwal 2021, arXiv:2102.09672), only what MAR uses.

MAR (arXiv:2406.11838, sec. 3) models each token's distribution with a small denoiser and borrows the diffusion
process of ADM/IDDPM unchanged: cosine noise schedule over T = 1000 steps, eps prediction, learned-range variance
trained by the variational bound, and respacing to 100 steps for sampling. ADM's file is 900 lines; this is the
part MAR calls, checked against the official code's numbers (tests/test_parity.py).

  cosine_betas            IDDPM Eq. 17 (cosine schedule), beta clipped at 0.999
  space_timesteps         IDDPM sec. 4 respacing (which of the 1000 steps to keep), IDDPM's accumulation
  GaussianDiffusion       q_sample (DDPM Eq. 4), q_posterior (DDPM Eqs. 6-7), predict_x0 (DDPM Eq. 4 solved for x0),
                          p_mean_variance (IDDPM Eq. 15, learned range), p_sample (MAR's reverse step with
                          temperature), training_losses (IDDPM Eq. 16, L_hybrid = L_simple + L_vlb)
  normal_kl, discretized_gaussian_log_likelihood   the two VLB terms (DDPM sec. 3.3)

Nothing here draws random numbers: every noise tensor is an argument, so the caller's generator decides it (the
randomness rule in mar.py). Depends only on numpy and torch; copy the file on its own.
"""
import math

import numpy as np
import torch


def cosine_betas(T=1000, max_beta=0.999):
    """IDDPM Eq. 17: alpha_bar(t) = f(t)/f(0), f(t) = cos(((t/T) + s)/(1 + s) * pi/2)^2, s = 0.008.

    beta_t = min(1 - alpha_bar(t+1)/alpha_bar(t), 0.999), float64. (The f(0) normalisation cancels in the ratio.)
    """
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.array([min(1 - f((i + 1) / T) / f(i / T), max_beta) for i in range(T)], dtype=np.float64)


def space_timesteps(T, spec):
    """IDDPM respacing (IDDPM sec. 4): which of T steps to keep. spec "100" -> 100 evenly spaced steps with a
    FRACTIONAL stride (T-1)/(n-1), rounding the accumulated index: {0, 10, 20, ..., 989, 999}. A comma list "10,15"
    splits T into equal sections.

    Deviation: "1" keeps {T-1} (one x0 prediction from pure noise). IDDPM keeps {0}, a no-op denoise of x_T on which
    its own posterior-variance code then fails; MAR never uses one step.
    """
    spec = str(spec)
    if spec == "1":
        return [T - 1]
    if spec.startswith("ddim"):
        raise NotImplementedError("ddimN respacing is not used by MAR; pass a step count such as '100'")
    counts = [int(s) for s in spec.split(",")]
    size, extra = divmod(T, len(counts))
    kept, start = set(), 0
    for i, n in enumerate(counts):
        length = size + (1 if i < extra else 0)
        if n > length or n < 1:
            raise ValueError(f"cannot keep {n} of {length} steps (respacing spec {spec!r})")
        stride = (length - 1) / (n - 1) if n > 1 else 1
        # The index ACCUMULATES (cur += stride), as IDDPM's respace.py does: round(stride * j) would keep different
        # steps for 278 of the counts 2..1000 (float error lands on the other side of .5; "100" is unaffected).
        cur = 0.0
        for _ in range(n):
            kept.add(start + round(cur))  # Python round (half to even), like IDDPM
            cur += stride
        start += length
    return sorted(kept)


class GaussianDiffusion:
    """MAR's diffusion: cosine schedule over T = 1000, eps prediction, learned-range variance, optional respacing.

    With `respacing` (e.g. "100") the process runs on a subset of steps `timestep_map` (IDDPM section 4): the betas
    are recomputed from the kept alpha_bar values, beta'_k = 1 - abar[t_k] / abar[t_{k-1}], and the network is
    always called with the ORIGINAL step t_k. Indices `t` passed to the methods below index this (respaced) process.

    Public arrays (float64 torch, on the CPU; `table(name, device)` gives each on a device): betas, log_betas,
    alphas_cumprod, alphas_cumprod_prev, sqrt_recip_alphas_cumprod, sqrt_recipm1_alphas_cumprod, posterior_variance,
    posterior_log_variance_clipped, posterior_mean_coef1/2; timestep_map (long).
    """

    def __init__(self, num_timesteps=1000, respacing=None):
        base_abar = np.cumprod(1.0 - cosine_betas(num_timesteps))
        kept = list(range(num_timesteps)) if respacing in (None, "") else space_timesteps(num_timesteps, respacing)
        betas, last = [], 1.0
        for t in kept:
            betas.append(1.0 - base_abar[t] / last)
            last = base_abar[t]
        b = np.array(betas, dtype=np.float64)
        abar = np.cumprod(1.0 - b)
        abar_prev = np.append(1.0, abar[:-1])
        post_var = b * (1.0 - abar_prev) / (1.0 - abar)  # variance of q(x_{t-1} | x_t, x0)
        T = torch.from_numpy
        self.num_timesteps = len(b)
        self.timestep_map = torch.tensor(kept, dtype=torch.long)
        self.betas, self.alphas_cumprod, self.alphas_cumprod_prev = T(b), T(abar), T(abar_prev)
        self.posterior_variance = T(post_var)
        # log of the posterior variance with entry 0 (which is 0) replaced by entry 1, as IDDPM does. With a single
        # step there is no entry 1; log(beta) stands in (step 0 adds no noise, so it is never used for sampling).
        clipped = np.append(post_var[1], post_var[1:]) if len(b) > 1 else b
        self.posterior_log_variance_clipped = T(np.log(clipped))
        self.posterior_mean_coef1 = T(b * np.sqrt(abar_prev) / (1.0 - abar))
        self.posterior_mean_coef2 = T((1.0 - abar_prev) * np.sqrt(1.0 - b) / (1.0 - abar))
        a = self.alphas_cumprod
        self.sqrt_recip_alphas_cumprod, self.sqrt_recipm1_alphas_cumprod = 1.0 / a.sqrt(), (1.0 / a - 1).sqrt()
        self.log_betas = self.betas.log()
        self._on_device = {}  # (name, device) -> the table on that device

    def table(self, name, device):
        """The table `name` on `device`, copied there once: lookups inside a sampling loop copy nothing from the
        host (a host-to-device copy from pageable memory makes the GPU wait, and a CUDA graph cannot hold it)."""
        key = (name, str(device))
        if key not in self._on_device:
            self._on_device[key] = getattr(self, name).to(device)
        return self._on_device[key]

    def _at(self, name, t, x):
        """Table `name` at steps t (N,) as fp32, shaped (N, 1, ...) to broadcast against x (official
        `_extract_into_tensor`)."""
        out = self.table(name, t.device)[t].float()
        return out.reshape(-1, *([1] * (x.dim() - 1)))  # (N, 1, ..., 1)

    def original_t(self, t):
        """The ORIGINAL step (of the 1000) of each of this process's step indices t: what the network is given."""
        return self.table("timestep_map", t.device)[t]

    def q_sample(self, x0, t, noise):
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps  (DDPM Eq. 4)."""
        a = self._at("alphas_cumprod", t, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def q_posterior(self, x0, x_t, t):
        """Mean and log-variance of q(x_{t-1} | x_t, x0) (DDPM Eqs. 6-7)."""
        mean = self._at("posterior_mean_coef1", t, x_t) * x0 + self._at("posterior_mean_coef2", t, x_t) * x_t
        return mean, self._at("posterior_log_variance_clipped", t, x_t)

    def predict_x0(self, x_t, t, eps):
        """x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t) (DDPM Eq. 4 solved for x0), written as
        sqrt(1/abar) x_t - sqrt(1/abar - 1) eps like the reference code."""
        return (self._at("sqrt_recip_alphas_cumprod", t, x_t) * x_t
                - self._at("sqrt_recipm1_alphas_cumprod", t, x_t) * eps)

    def p_mean_variance(self, model_out, x_t, t, clip_denoised=False):
        """p(x_{t-1} | x_t) from the head's output (N, 2C) = [eps | v] (IDDPM Eq. 15, learned-range variance).

        log var = frac * log(beta_t) + (1 - frac) * log(posterior var), frac = (v + 1) / 2.
        Returns dict(mean, variance, log_variance, pred_xstart). `clip_denoised` bounds x0 (see `clip_x0`): MAR
        passes False; the toy clips to its latents' range.
        """
        C = x_t.shape[-1]
        eps, v = model_out[..., :C], model_out[..., C:]
        min_log = self._at("posterior_log_variance_clipped", t, x_t)
        max_log = self._at("log_betas", t, x_t)
        frac = (v + 1) / 2
        log_var = frac * max_log + (1 - frac) * min_log
        x0 = clip_x0(self.predict_x0(x_t, t, eps), clip_denoised)
        mean, _ = self.q_posterior(x0, x_t, t)
        return {"mean": mean, "variance": log_var.exp(), "log_variance": log_var, "pred_xstart": x0}

    def p_sample(self, model_out, x_t, t, noise, temperature=1.0, clip_denoised=False):
        """One reverse step: x_{t-1} = mean + [t > 0] * exp(log_var / 2) * noise * temperature (MAR sec. 3.2, Eq. 2,
        with its temperature tau: sigma_t tau delta).

        The temperature scales only the per-step noise (MAR's sigma_t * tau * delta), not the initial x_T.
        """
        out = self.p_mean_variance(model_out, x_t, t, clip_denoised)
        nonzero = (t != 0).float().reshape(-1, *([1] * (x_t.dim() - 1)))  # (N, 1, ..., 1)
        return out["mean"] + nonzero * (0.5 * out["log_variance"]).exp() * noise * temperature

    def training_losses(self, net, x0, t, c, noise):
        """MAR's per-row loss: MSE(eps) + variational bound on the variance only (IDDPM Eq. 16, L_hybrid, lambda=1).

        x0, noise (N, C); t (N,) indices of THIS process (the 1000-step one in training); c (N, Dz).
        The vb term sees the eps prediction DETACHED, so it trains only the variance channels. It is the KL of
        q(x_{t-1}|x_t,x0) to p(x_{t-1}|x_t) in bits for t > 0 and the discretised-Gaussian NLL of x0 for t = 0.
        Returns dict(mse, vb, loss), each (N,).
        """
        x_t = self.q_sample(x0, t, noise)
        out = net(x_t, self.original_t(t), c)  # (N, 2C)
        C = x0.shape[-1]
        mse = ((noise - out[:, :C]) ** 2).mean(dim=-1)
        frozen = torch.cat([out[:, :C].detach(), out[:, C:]], dim=-1)
        p = self.p_mean_variance(frozen, x_t, t)
        true_mean, true_logvar = self.q_posterior(x0, x_t, t)
        kl = normal_kl(true_mean, true_logvar, p["mean"], p["log_variance"]).mean(dim=-1) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, p["mean"], 0.5 * p["log_variance"]).mean(dim=-1) / math.log(2.0)
        vb = torch.where(t == 0, nll, kl)
        return {"mse": mse, "vb": vb, "loss": mse + vb}


def clip_x0(x0, bound):
    """The predicted x0 clamped to [-b, b]: bound False / None leaves it as is (MAR: clip_denoised=False), True is
    [-1, 1] (pixel data, IDDPM's clip_denoised), a number b is [-b, b] (the toy: its latents' range,
    docs/results.md section 7).

    Why a toy needs it: at t = 999 the sampler reads x0 = x_t / sqrt(abar) - sqrt(1/abar - 1) eps with
    sqrt(1/abar_999 - 1) = 20,291, and the first reverse step of the 100-step respacing (999 -> 989) weighs that x0 by
    sqrt(abar_989) ~ 0.016, so an eps error e becomes about 316 e in x_989.
    MAR's large, long-trained heads keep e small enough; a toy head (eps error ~0.03 at t = 999) gives latents in
    the hundreds. Clamping x0 to the data range throws the amplified error away; it is inactive once x0 is sane.
    """
    if bound is None or bound is False:
        return x0
    b = 1.0 if bound is True else float(bound)
    return x0.clamp(-b, b)


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise: the L_{t-1} terms of the VLB (DDPM Eq. 5)."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + (logvar1 - logvar2).exp() + (mean1 - mean2) ** 2 * (-logvar2).exp())


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log-likelihood of data x in [-1, 1] quantised to 256 bins under N(means, e^(2 log_scales)) (DDPM sec. 3.3).

    MAR applies this verbatim to its latents at t = 0 (the bin edges assume 8-bit data); we keep it for parity.
    """
    def cdf(v):  # tanh approximation of the standard normal CDF, as in the reference code
        return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v ** 3)))

    centered, inv_std = x - means, (-log_scales).exp()
    cdf_plus, cdf_min = cdf(inv_std * (centered + 1.0 / 255)), cdf(inv_std * (centered - 1.0 / 255))
    log_cdf_plus = cdf_plus.clamp(min=1e-12).log()
    log_one_minus_cdf_min = (1.0 - cdf_min).clamp(min=1e-12).log()
    log_delta = (cdf_plus - cdf_min).clamp(min=1e-12).log()
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))
