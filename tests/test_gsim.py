"""The GSIM generator loss against analytic teachers.

1. 1-D: teacher N(0, 1), student x0 = theta z, one noise level. The surrogate's gradient must equal the finite-
   difference gradient of the divergence D(theta) = E_{x ~ q_theta,t} d(s_q(x) - s_p(x)); dropping the path term or
   detaching d'(y) must not.
2. 2-D: a class-conditional Gaussian mixture (unequal mode weights) whose noisy score is exact plays the teacher; a
   one-step MLP generator and an auxiliary eps-MLP trained with `gsim_generator_loss` and `aux_dsm_loss` must move
   several-fold closer to the mixture (energy distance) than the one-step initialisation and land within 0.05 of the
   mode weights; the same run with y's sign flipped must move away. Measured here (900 iterations, batch 512): energy
   distance 0.048 at the start -> ~0.011, mode weights within ~0.03; the two-sample noise floor is 0.0007, so the
   run does NOT reach the floor in this budget (see the README's notes on GSIM).
"""
import math

import pytest
import torch
import torch.nn as nn

import mar
from distill_gsim import aux_dsm_loss, gsim_generator_loss

# ----------------------------------------------------------------------------------------------------------------
# 1-D check
# ----------------------------------------------------------------------------------------------------------------

ALPHA, SIGMA, R, THETA = 0.8, 0.6, 0.3, 1.7


def quantile_grid(n):
    """Equal-weight quadrature for N(0, 1): the midpoints of n equal-probability bins."""
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    return math.sqrt(2) * torch.erfinv(2 * u - 1)


def divergence(theta, u):
    """D(theta) = E_x d(y(x)), x ~ q_t = N(0, v), v = alpha^2 theta^2 + sigma^2; y = s_q - s_p = -x/v + x."""
    v = ALPHA ** 2 * theta ** 2 + SIGMA ** 2
    x = math.sqrt(v) * u
    y = x * (1 - 1 / v)
    return ((y ** 2 + R ** 2).sqrt() - R).mean().item()


def surrogate_grad(variant="gsim", n=1000):
    """d/dtheta of the eps-form loss / sigma, over a (z, eps) quadrature grid; the scores use theta frozen."""
    g = quantile_grid(n)
    z, eps = g.repeat_interleave(n)[:, None], g.repeat(n)[:, None]
    theta = torch.tensor(THETA, dtype=torch.float64, requires_grad=True)
    x_t = ALPHA * theta * z + SIGMA * eps
    v_sg = ALPHA ** 2 * THETA ** 2 + SIGMA ** 2                      # student score with frozen parameters
    eps_teacher, eps_aux = SIGMA * x_t, SIGMA * x_t / v_sg           # eps = -sigma * score
    if variant == "detached":  # d'(y) computed from detached inputs: a tempting, wrong shortcut
        delta = (eps_teacher - eps_aux).detach()
        den = (delta.square().sum(-1) + (SIGMA * R) ** 2).sqrt()
        loss = ((delta * (eps_aux - eps)).sum(-1) / den + den).mean()
    else:
        loss = gsim_generator_loss(eps_teacher, eps_aux, eps, SIGMA, R, 0.0 if variant == "no_path" else 1.0)
    loss.backward()
    return theta.grad.item() / SIGMA


def test_one_dimensional_gradient_equals_finite_difference():
    u, h = quantile_grid(200_000), 1e-4
    fd = (divergence(THETA + h, u) - divergence(THETA - h, u)) / (2 * h)
    assert fd == pytest.approx(0.7708, abs=2e-3)  # DESIGN 5.1
    gsim = surrogate_grad("gsim")
    assert gsim == pytest.approx(fd, abs=3e-3)
    assert surrogate_grad("no_path") == pytest.approx(0.480, abs=5e-3)    # SIM's L1 alone: not this gradient
    assert surrogate_grad("detached") == pytest.approx(0.240, abs=5e-3)   # d'(y) detached: wrong
    assert abs(surrogate_grad("no_path") - fd) > 0.2 and abs(surrogate_grad("detached") - fd) > 0.4


def test_loss_value_and_shapes():
    """Per token: <Delta, eps_phi - eps>/den + den - sigma r, averaged; sigma may be per token or a scalar."""
    et, ea, n = torch.randn(5, 3), torch.randn(5, 3), torch.randn(5, 3)
    sig = torch.rand(5) + 0.1
    d = et - ea
    den = (d.square().sum(1) + (sig * 0.1) ** 2).sqrt()
    want = ((d * (ea - n)).sum(1) / den + den - sig * 0.1).mean()
    torch.testing.assert_close(gsim_generator_loss(et, ea, n, sig, 0.1), want)
    torch.testing.assert_close(gsim_generator_loss(et, ea, n, sig[:, None], 0.1), want)
    torch.testing.assert_close(gsim_generator_loss(et, ea, n, 0.5, 0.1),
                               gsim_generator_loss(et, ea, n, torch.full((5,), 0.5), 0.1))


# ----------------------------------------------------------------------------------------------------------------
# 2-D class-conditional Gaussian mixture
# ----------------------------------------------------------------------------------------------------------------

RADIUS, MODE_STD = 1.0, 0.25  # modes overlap a little at moderate noise, so mass moves within a CI budget
WEIGHTS = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25]])
ANGLES = torch.tensor([[0.0, 0.5, 1.0, 1.5], [0.25, 0.75, 1.25, 1.75]]) * math.pi
MEANS = RADIUS * torch.stack([ANGLES.cos(), ANGLES.sin()], dim=-1)  # (2 classes, 4 modes, 2)
DIFF = mar.GaussianDiffusion(1000)
ABAR = DIFF.alphas_cumprod.float()


def teacher_eps(x_t, t, c):
    """Exact eps = -sigma_t * grad log p_t(x_t | c) of the noised mixture sum_k w_k N(alpha mu_k, alpha^2 s^2 + sigma^2)."""
    a, s2 = ABAR[t].sqrt()[:, None, None], (1 - ABAR[t])[:, None, None]                # (N, 1, 1)
    var = a ** 2 * MODE_STD ** 2 + s2
    diff = x_t[:, None, :] - a * MEANS[c]                                             # (N, 4, 2)
    logits = WEIGHTS[c].log() - diff.square().sum(-1) / (2 * var[..., 0])            # (N, 4)
    resp = logits.softmax(-1)[..., None]
    score = -(resp * diff / var).sum(1)                                               # (N, 2)
    return s2[:, :, 0].sqrt() * -score


def sample_mixture(c, gen):
    k = torch.multinomial(WEIGHTS[c], 1, generator=gen)[:, 0]
    return MEANS[c, k] + MODE_STD * torch.randn(len(c), 2, generator=gen)


def mode_weights(x, c):
    """Share of samples nearest to each mode, per class: (2, 4)."""
    out = torch.zeros(2, 4)
    for k in range(2):
        xk = x[c == k]
        nearest = (xk[:, None] - MEANS[k][None]).norm(dim=-1).argmin(1)
        out[k] = torch.bincount(nearest, minlength=4).float() / len(xk)
    return out


def energy_distance(a, b):
    return (2 * torch.cdist(a, b).mean() - torch.cdist(a, a).mean() - torch.cdist(b, b).mean()).item()


class EpsMLP(nn.Module):
    """eps(x, t, class) = exact teacher eps + MLP residual on [x, sinusoidal(t), one-hot class].

    The residual's final layer is zero, so at the start the network IS the teacher: MARVAL initialises both the
    generator and the auxiliary as copies of the teacher's head, and the teacher here is analytic.
    """

    def __init__(self, width=128):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2 + 16 + 2, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 2))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, x, t, c):
        freqs = torch.exp(-math.log(1000) * torch.arange(8) / 8)
        args = t[:, None].float() * freqs
        residual = self.net(torch.cat([x, args.cos(), args.sin(), nn.functional.one_hot(c, 2).float()], -1))
        return teacher_eps(x, t, c) + residual


def run_gsim_2d(flip_sign=False, iters=900, batch=512, seed=0):
    """Distill the exact mixture teacher into a one-step generator x0 = (z - sigma_400 eps_G(z, 400, c)) / alpha_400."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    G, aux = EpsMLP(), EpsMLP()
    def generate(c, z):
        t_star = torch.full((len(z),), mar.ONE_STEP_T)
        return DIFF.predict_x0(z, t_star, G(z, t_star, c))

    opt_g = torch.optim.Adam(G.parameters(), lr=1e-4, betas=(0.0, 0.999))
    opt_a = torch.optim.Adam(aux.parameters(), lr=3e-4, betas=(0.0, 0.999))
    for it in range(iters):
        c = torch.randint(0, 2, (batch,), generator=gen)
        z = torch.randn(batch, 2, generator=gen)
        if True:
            x0 = generate(c, z)
            t = torch.randint(20, 981, (batch,), generator=gen)
            eps = torch.randn(batch, 2, generator=gen)
            x_t = DIFF.q_sample(x0, t, eps)
            aux.requires_grad_(False)
            e_p, e_a = teacher_eps(x_t, t, c), aux(x_t, t, c)
            if flip_sign:  # y -> -y
                e_p = 2 * e_a - e_p
            loss = gsim_generator_loss(e_p, e_a, eps, (1 - ABAR[t]).sqrt(), 1e-5)
            opt_g.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(G.parameters(), 1.0)
            opt_g.step()
            aux.requires_grad_(True)
        with torch.no_grad():
            x0 = generate(c, z)
        for _ in range(2):
            la = aux_dsm_loss(aux, x0, c, DIFF, gen)
            opt_a.zero_grad()
            la.backward()
            opt_a.step()
    with torch.no_grad():
        c = torch.arange(8000) % 2
        z = torch.randn(8000, 2, generator=torch.Generator().manual_seed(99))
        return generate(c, z), c


@pytest.fixture(scope="module")
def truth():
    gen = torch.Generator().manual_seed(123)
    c = torch.arange(8000) % 2
    a, b = sample_mixture(c, gen), sample_mixture(c, gen)
    return c, a, b


def test_teacher_score_is_exact(truth):
    """The analytic eps is the true noise predictor: its DSM loss on true samples beats any shrunken version."""
    c, x0, _ = truth
    t = torch.randint(0, 1000, (len(c),), generator=torch.Generator().manual_seed(1))
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    pred = teacher_eps(DIFF.q_sample(x0, t, eps), t, c)
    mse = (pred - eps).square().mean()
    assert mse < (0.9 * pred - eps).square().mean() and mse < (1.1 * pred - eps).square().mean()


def test_gsim_moves_to_the_mixture_and_a_flipped_sign_does_not(truth):
    c, real_a, real_b = truth
    per_class = lambda x, cx, ref: sum(energy_distance(x[cx == k], ref[c == k]) for k in range(2)) / 2
    floor = per_class(real_b, c, real_a)
    start, cs = run_gsim_2d(iters=0)  # the one-step initialisation: the teacher's x0 prediction from t = 400
    ed0 = per_class(start, cs, real_a)
    x, cx = run_gsim_2d()
    ed, w = per_class(x, cx, real_a), mode_weights(x, cx)
    print(f"GSIM 2-D: energy distance {ed0:.4f} -> {ed:.4f} (floor {floor:.4f}); weights {w.numpy().round(3).tolist()}")
    assert ed < ed0 / 3, (ed0, ed)
    assert (w - WEIGHTS).abs().max() < 0.05, w
    bad, cb = run_gsim_2d(flip_sign=True, iters=300)
    ed_bad = per_class(bad, cb, real_a)
    assert ed_bad > 3 * ed0, (ed_bad, ed0)
