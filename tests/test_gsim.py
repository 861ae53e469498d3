"""The GSIM generator loss against analytic teachers.

1. 1-D: teacher N(0, 1), student x0 = theta z, one noise level. The surrogate's gradient must equal the finite-
   difference gradient of the divergence D(theta) = E_{x ~ q_theta,t} d(s_q(x) - s_p(x)); dropping the path term or
   detaching d'(y) must not.
2. 2-D: a class-conditional Gaussian mixture (unequal mode weights) whose noisy score is exact plays the teacher. A
   one-step generator (x0 from eps at t* = 400, DESIGN 1.3) and an auxiliary eps network, both initialised as copies
   of the teacher, trained with `gsim_generator_loss` and `aux_dsm_loss`, must come close to the teacher's own
   sampling noise floor (two independent sets of exact samples) in sliced Wasserstein and energy distance and recover
   the mode weights; the same run with the sign of y flipped must fail the same check, and detaching x_t from both
   networks (the DMD-style shortcut) must leave the generator with exactly zero gradient.
   Measured (3,000 iterations, ~30 s on 2 threads; seeds 0 / 1 / 2): sliced W2 1.45 / 1.80 / 1.59x the floor and
   energy distance 2.6 / 3.4 / 2.8x (the one-step start: 5.6x and 47x), mode masses within 0.016 / 0.020 / 0.015 of
   the true weights (start: 0.067). Longer runs (`PYTHONPATH=. python tests/test_gsim.py --iters 12000`) reach the
   floor: GSIM converges there, the CI budget is what stops it short.
"""
import copy
import math

import pytest
import torch
import torch.nn as nn

import common
import mar
from distill_gsim import aux_dsm_loss, gsim_generator_loss
from gaussian_diffusion import GaussianDiffusion

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
        path_weight = {"gsim": 1.0, "no_path": 0.0, "minus_path": -1.0}[variant]
        loss = gsim_generator_loss(eps_teacher, eps_aux, eps, SIGMA, R, path_weight)
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
    # The path term SUBTRACTED (L1 - d(y), how MARVAL's A.11 can be read): 0.480 - 0.290, not the divergence's gradient.
    assert surrogate_grad("minus_path") == pytest.approx(0.190, abs=5e-3)


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
    # per-token weights multiply each token's loss before the mean (token 2 weighted out, token 0 doubled)
    w = torch.tensor([2.0, 1.0, 0.0, 1.0, 1.0])
    per = torch.stack([gsim_generator_loss(et[i:i + 1], ea[i:i + 1], n[i:i + 1], sig[i:i + 1], 0.1) for i in range(5)])
    torch.testing.assert_close(gsim_generator_loss(et, ea, n, sig, 0.1, weight=w), (per * w).mean())


# ----------------------------------------------------------------------------------------------------------------
# 2-D class-conditional Gaussian mixture
# ----------------------------------------------------------------------------------------------------------------

RADIUS, MODE_STD = 1.0, 0.25
WEIGHTS = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25]])
ANGLES = torch.tensor([[0.0, 0.5, 1.0, 1.5], [0.25, 0.75, 1.25, 1.75]]) * math.pi
MEANS = RADIUS * torch.stack([ANGLES.cos(), ANGLES.sin()], dim=-1)  # (2 classes, 4 modes, 2)
DIFF = GaussianDiffusion(1000)
ABAR = DIFF.alphas_cumprod.float()


def mixture_eps(x_t, t, c, log_w, means, log_std):
    """Exact eps = -sigma_t grad log p_t(x_t | c) of the noised mixture sum_k w_k N(alpha mu_k, alpha^2 s^2 + sigma^2).

    log_w (classes, K) unnormalised log-weights, means (classes, K, 2), log_std (classes,): constants for the
    teacher, trainable parameters for the student and the auxiliary network (autograd flows through all of them).
    """
    a, s2 = ABAR[t].sqrt()[:, None], (1 - ABAR[t])[:, None]                         # (N, 1)
    var = a ** 2 * log_std[c, None].exp() ** 2 + s2                                # (N, 1)
    diff = x_t[:, None, :] - a[:, :, None] * means[c]                               # (N, K, 2)
    resp = (log_w[c].log_softmax(-1) - diff.square().sum(-1) / (2 * var)).softmax(-1)
    score = -(resp[..., None] * diff).sum(1) / var                                  # (N, 2)
    return -s2.sqrt() * score


def teacher_eps(x_t, t, c):
    return mixture_eps(x_t, t, c, WEIGHTS.log(), MEANS, torch.full((2,), math.log(MODE_STD)))


def sample_mixture(c, gen):
    k = torch.multinomial(WEIGHTS[c], 1, generator=gen)[:, 0]
    return MEANS[c, k] + MODE_STD * torch.randn(len(c), 2, generator=gen)


def mode_weights(x, c):
    """Share of samples nearest to each mode, per class: (2, 4)."""
    out = torch.zeros(2, 4)
    for k in range(2):
        nearest = (x[c == k][:, None] - MEANS[k][None]).norm(dim=-1).argmin(1)
        out[k] = torch.bincount(nearest, minlength=4).float() / int((c == k).sum())
    return out


def energy_distance(a, b):
    return (2 * torch.cdist(a, b).mean() - torch.cdist(a, a).mean() - torch.cdist(b, b).mean()).item()


def sliced_w2(a, b, n_dirs=512):
    """Sliced 2-Wasserstein distance of two equal-size sample sets, over n_dirs evenly spaced directions."""
    ang = torch.arange(n_dirs) * math.pi / n_dirs
    dirs = torch.stack([ang.cos(), ang.sin()], 1)
    pa, pb = (a @ dirs.T).sort(0).values, (b @ dirs.T).sort(0).values
    return (pa - pb).square().mean().sqrt().item()


def per_class(metric, x, cx, ref, cref):
    return sum(metric(x[cx == k], ref[cref == k]) for k in range(2)) / 2


class MixtureEpsNet(nn.Module):
    """eps(x, t, class) = a Gaussian mixture's exact eps with TRAINABLE log-weights, means and width, plus an MLP
    residual on [x, sinusoidal(t), one-hot class] whose last layer starts at zero.

    At initialisation it IS the teacher, and every parameter trains: the analogue of MARVAL initialising the student
    and the auxiliary as full copies of the teacher's head. (An earlier version froze the teacher part and trained
    only the residual. Its generator stalled near the initial mode masses, even with an exact auxiliary (the score of
    its own samples): a smooth residual hardly moves the sharp switch between modes that the frozen part puts in eps.
    With a trainable generator but that frozen-part auxiliary, the masses came right but the modes stayed blurred.)
    """

    def __init__(self, width=128):
        super().__init__()
        self.log_w = nn.Parameter(WEIGHTS.log().clone())
        self.means = nn.Parameter(MEANS.clone())
        self.log_std = nn.Parameter(torch.full((2,), math.log(MODE_STD)))
        self.net = nn.Sequential(nn.Linear(2 + 16 + 2, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 2))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, x, t, c):
        args = t[:, None].float() * torch.exp(-math.log(1000) * torch.arange(8) / 8)
        residual = self.net(torch.cat([x, args.cos(), args.sin(), nn.functional.one_hot(c, 2).float()], -1))
        return mixture_eps(x, t, c, self.log_w, self.means, self.log_std) + residual


def one_step(net, c, z):
    """DESIGN 1.3: x0 = (z - sigma_400 eps(z, 400, c)) / alpha_400, z read as x_400."""
    t_star = torch.full((len(z),), mar.ONE_STEP_T)
    return DIFF.predict_x0(z, t_star, net(z, t_star, c))


def generator_loss(G, aux, c, z, gen, flip_sign=False):
    """One GSIM generator loss evaluation, as distill_gsim.gsim_step does it per token (t in 20..980)."""
    x0 = one_step(G, c, z)
    t = torch.randint(20, 981, (len(z),), generator=gen)
    eps = torch.randn(z.shape, generator=gen)
    x_t = DIFF.q_sample(x0, t, eps)
    e_p, e_a = teacher_eps(x_t, t, c), aux(x_t, t, c)
    if flip_sign:  # y -> -y
        e_p = 2 * e_a - e_p
    return gsim_generator_loss(e_p, e_a, eps, (1 - ABAR[t]).sqrt(), 1e-5)


def run_gsim_2d(flip_sign=False, iters=3000, batch=512, seed=0):
    """Distill the exact mixture teacher into a one-step generator; return its EMA.

    Adam (0, 0.999) at 1e-3 for both networks (the generator's lr decays linearly to 0: the pseudo-Huber direction
    does not shrink near the optimum, so a constant lr keeps it jittering), two aux DSM steps per generator step,
    EMA 0.99 of the generator, grad clip 1.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    G, aux = MixtureEpsNet(), MixtureEpsNet()
    G_ema = copy.deepcopy(G).requires_grad_(False)
    opt_g = torch.optim.Adam(G.parameters(), lr=1e-3, betas=(0.0, 0.999))
    opt_a = torch.optim.Adam(aux.parameters(), lr=1e-3, betas=(0.0, 0.999))
    sched = torch.optim.lr_scheduler.LambdaLR(opt_g, lambda i: 1 - i / max(iters, 1))
    for _ in range(iters):
        c = torch.randint(0, 2, (batch,), generator=gen)
        z = torch.randn(batch, 2, generator=gen)
        aux.requires_grad_(False)  # its parameters are constants here; its input x_t is not detached
        loss = generator_loss(G, aux, c, z, gen, flip_sign)
        opt_g.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(G.parameters(), 1.0)
        opt_g.step()
        sched.step()
        common.update_ema(G_ema, G, 0.99)
        aux.requires_grad_(True)
        with torch.no_grad():
            x0 = one_step(G, c, z)
        for _ in range(2):
            la = aux_dsm_loss(aux, x0, c, DIFF, gen)
            opt_a.zero_grad()
            la.backward()
            opt_a.step()
    return G_ema


def student_samples(G, n, seed=99):
    c = torch.arange(n) % 2
    with torch.no_grad():
        return one_step(G, c, torch.randn(n, 2, generator=torch.Generator().manual_seed(seed))), c


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
    net = MixtureEpsNet()  # a fresh network is a copy of the teacher
    torch.testing.assert_close(net(x0, t, c), teacher_eps(x0, t, c))


def test_detached_inputs_give_exactly_zero_generator_gradient():
    """DMD-style no_grad around the teacher and aux calls turns the GSIM surrogate into a constant (gsim_spec 1.1)."""
    gen = torch.Generator().manual_seed(0)
    G, aux = MixtureEpsNet(), MixtureEpsNet()
    with torch.no_grad():  # make the aux differ from the teacher, so Delta != 0
        aux.net[-1].weight.normal_(0, 0.1, generator=gen)
    aux.requires_grad_(False)
    c, z = torch.randint(0, 2, (256,), generator=gen), torch.randn(256, 2, generator=gen)
    x_t = DIFF.q_sample(one_step(G, c, z), torch.full((256,), 500), torch.randn(256, 2, generator=gen)).detach()
    t = torch.full((256,), 500)
    const = gsim_generator_loss(teacher_eps(x_t, t, c), aux(x_t, t, c), torch.randn(256, 2), 0.5, 1e-5)
    assert not const.requires_grad  # no path from the generator's parameters at all: zero gradient
    loss = generator_loss(G, aux, c, z, gen)  # the right way round: a real gradient
    loss.backward()
    assert sum(p.grad.abs().sum() for p in G.parameters()) > 0


def distances(G, truth):
    """Per-class sliced W2 and energy distance to exact samples (8,000, as the floor), and the largest error of the
    mode masses against the true weights on 40,000 samples (nearest-mode shares; at this separation the nearest-mode
    share of the true mixture equals its weight to 0.001, and 20,000 per class keep the sampling error near 0.003)."""
    c, real_a, real_b = truth
    x, cx = student_samples(G, len(c))
    w = mode_weights(*student_samples(G, 40_000, seed=98))
    return dict(sw=per_class(sliced_w2, x, cx, real_a, c), ed=per_class(energy_distance, x, cx, real_a, c),
                sw_floor=per_class(sliced_w2, real_b, c, real_a, c),
                ed_floor=per_class(energy_distance, real_b, c, real_a, c),
                weights=w, w_err=(w - WEIGHTS).abs().max().item())


def test_gsim_reaches_the_mixture_and_a_flipped_sign_does_not(truth):
    start = distances(run_gsim_2d(iters=0), truth)  # the one-step initialisation: the teacher's x0 guess from t = 400
    end = distances(run_gsim_2d(), truth)
    print(f"GSIM 2-D: SW {start['sw']:.4f} -> {end['sw']:.4f} (floor {end['sw_floor']:.4f}); energy distance "
          f"{start['ed']:.4f} -> {end['ed']:.4f} (floor {end['ed_floor']:.4f}); mass error {start['w_err']:.3f} -> "
          f"{end['w_err']:.3f}")
    assert start["sw"] > 5 * start["sw_floor"] and start["ed"] > 30 * start["ed_floor"]  # the start is far away
    assert start["w_err"] > 0.05
    assert end["sw"] < 2.2 * end["sw_floor"], end
    assert end["ed"] < 5 * end["ed_floor"], end
    assert end["w_err"] < 0.03, end["weights"]
    bad = distances(run_gsim_2d(flip_sign=True, iters=300), truth)
    assert bad["ed"] > 3 * start["ed"] and bad["sw"] > start["sw"], bad


if __name__ == "__main__":  # longer runs than CI affords: python tests/test_gsim.py --iters 12000
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(123)
    c = torch.arange(8000) % 2
    truth_ = (c, sample_mixture(c, gen), sample_mixture(c, gen))
    d = distances(run_gsim_2d(iters=args.iters, seed=args.seed), truth_)
    print(f"iters {args.iters} seed {args.seed}: SW {d['sw']:.4f} = {d['sw'] / d['sw_floor']:.2f}x floor, energy "
          f"distance {d['ed']:.5f} = {d['ed'] / d['ed_floor']:.2f}x floor, mass error {d['w_err']:.3f}; "
          f"weights {d['weights'].numpy().round(3).tolist()}")
