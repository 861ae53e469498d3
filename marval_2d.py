"""MARVAL in two dimensions: the whole method on one 2-D "token", in about a minute on a 2-core CPU.

In MAR every token of an image is drawn by a small diffusion head from the condition c the transformer gives it;
MARVAL (Gu et al. 2025, arXiv:2511.15190) replaces the head's ~100 reverse steps by ONE, then fine-tunes the result
with a reward. Here the "token" is a point in the plane and c is one of two classes, so every piece can be seen:

  1. Teacher: a class-conditional Gaussian mixture whose noisy eps is exact at every t, guided by CFG in MAR's form
     eps_u + cfg (eps_c - eps_u) (mar.guided_eps; MARVAL Eq. 10 with w = cfg - 1, docs/derivation.md section 3),
     sampled with its own 100-step reverse diffusion: the head's job in MAR. With cfg != 1 the guided eps is not the
     score of one distribution, so the 100-step samples approximate what GSIM matches.
  2. Stage 1, GSIM: a one-step generator g(z, c) = mar.one_step_x0 (z read as x_400; G below is its eps network) and
     an auxiliary eps network, both copies of the teacher at the start, trained in turn with the project's
     `gsim_generator_loss` (time weight sigma_t, p = 1; the digits toy uses p = 3) and `aux_dsm_loss`, towards the
     floor: how far apart two sets of teacher samples are (100-step samples of the guided teacher, which GSIM's target
     only approximates at cfg != 1, so the floor is a yardstick, not a bound). What the generator must learn is a
     steep switch between modes; its eps network reads x through Fourier features so that it can (`run_gsim`;
     --raw-inputs both: polygons).
  3. Stage 2, RL: a reward (the log density of a target disc that overlaps some modes) back-propagated through the
     one-step generator, with and without the DRaFT+ penalty toward the frozen student: without it every sample
     piles onto the reward's peak (reward hacking); with it the student moves less.

Writes OUT_DIR/marval_2d.png (teacher, student during GSIM, after RL with / without the penalty on one [-2, 2]^2
window; distance to the floor against iterations; class 0's mode masses) and OUT_DIR/report.json (`ed_over_floor`,
`reward_before`, `reward_after`, mode masses).

    python marval_2d.py --out-dir runs/2d
    python marval_2d.py --out-dir runs/2d_sim --path-weight 0      # SIM's loss (no path term): a biased gradient

Knobs, and what a student of the course sees (measured; the numbers: docs/results.md, section 3):
  --path-weight 0     SIM's loss without the path term d(y): a biased gradient (tests/test_gsim.py's 1-D check: 0.48
                      against 0.77), which here makes no visible difference.
  --flip-sign         y -> -y: GSIM drives the student away from the teacher, far out of the window.
  --detach-dprime     Delta without gradient, so d(y) and d'(y) are constants and only eps_phi(x_t) in the
                      projection term carries one (tests/test_gsim.py's 1-D "detached").
  --raw-inputs both   the residuals read raw coordinates, no Fourier features: each class becomes a polygon
                      (`run_gsim` says why; `generator` or `aux` drops the features of one network only).
  --aux-steps 1       one aux update per generator update.
  --cfg 2             a stronger guidance: the teacher's modes sharpen, its weakest mode shrinks and the student's
                      vanishes.
  --r 1               a large pseudo-Huber constant turns d(y) into a squared loss.
  --reg-weight       the DRaFT+ penalty of the penalised RL run (the last panel is always the run without it).
"""
import argparse
import copy
import json
import math
import os

import torch
import torch.nn as nn

import common
import figures
import mar
from distill_gsim import aux_dsm_loss, gsim_generator_loss
from gaussian_diffusion import GaussianDiffusion

# ==== The teacher: a class-conditional Gaussian mixture with an exact noisy score ===================================

# Two classes of four modes each on a circle, with unequal weights in class 0. Class 2 is the null class of CFG: the
# mixture of both (p(x) = p(x | 0) / 2 + p(x | 1) / 2). Each class lists all 8 modes; a class's foreign modes get
# weight ~0 (log-weight -30), so one formula serves the conditional and the unconditional eps.
MODE_STD = 0.25
ANGLES = torch.tensor([[0.0, 0.5, 1.0, 1.5], [0.25, 0.75, 1.25, 1.75]]) * math.pi
MODE_MEANS = torch.stack([ANGLES.cos(), ANGLES.sin()], dim=-1).reshape(8, 2)                  # (8 modes, 2)
CLASS_WEIGHTS = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25]])                # (2, 4)
NULL = 2
_w = torch.full((3, 8), 1e-13)
_w[0, :4], _w[1, 4:], _w[2] = CLASS_WEIGHTS[0], CLASS_WEIGHTS[1], torch.cat(list(CLASS_WEIGHTS)) / 2
LOG_WEIGHTS = _w.log()                                                                        # (3 classes, 8)
LOG_STD = torch.full((3,), math.log(MODE_STD))                                                # (3 classes,)
DIFF = GaussianDiffusion(1000)  # the 1000-step cosine process of MAR's head
ABAR = DIFF.alphas_cumprod.float()


def mixture_eps(x_t, t, c, log_w, means, log_std):
    """Exact eps = -sigma_t grad log p_t(x_t | c) of the noised mixture sum_k w_k N(alpha_t mu_k, alpha_t^2 s^2 +
    sigma_t^2), x_t (N, 2), t (N,), c (N,). log_w (classes, K) unnormalised, means (K, 2), log_std (classes,): the
    teacher's constants, or a network's trainable parameters (autograd flows through all of them)."""
    a, sig2 = ABAR[t].sqrt()[:, None], (1 - ABAR[t])[:, None]                       # (N, 1): alpha_t, sigma_t^2
    var = a ** 2 * log_std[c, None].exp() ** 2 + sig2                               # (N, 1): s = exp(log_std[c])
    diff = x_t[:, None, :] - a[:, :, None] * means[None]                            # (N, K, 2)
    resp = (log_w[c].log_softmax(-1) - diff.square().sum(-1) / (2 * var)).softmax(-1)  # (N, K) posterior of the mode
    score = -(resp[..., None] * diff).sum(1) / var                                  # (N, 2)
    return -sig2.sqrt() * score


X_FREQS = (1.0, 2.0, 4.0, 8.0)  # Fourier features of x for the residual: periods 2 pi / f, from 6.3 down to 0.8


class MixtureEpsNet(nn.Module):
    """eps(x_t, t, c): the mixture's exact eps with trainable log-weights, means and widths, plus an MLP residual on
    [x_t, cos / sin(f x_t) for f in X_FREQS, sinusoidal(t), one-hot c] whose last layer starts at zero. At
    initialisation it IS the teacher: MARVAL initialises the student and the auxiliary network as full copies of the
    teacher's head, and both train every parameter.

    Why the residual reads x through Fourier features (Tancik et al. 2020, arXiv:2006.10739): the one-step generator
    needs a steep function, the switch from one mode to the next (`run_gsim`). A small MLP on raw 2-D coordinates
    learns steep functions slowly (its spectral bias, Rahaman et al. 2019, arXiv:1806.08734): its first layer's slopes
    start near 0.2 and have to grow through three layers. cos / sin(8 x) have slope 8 from the start, so a steep
    switch is a readout of features the network already has. raw_inputs=True drops them.
    """

    def __init__(self, width=128, raw_inputs=False):
        super().__init__()
        self.log_w, self.means = nn.Parameter(LOG_WEIGHTS.clone()), nn.Parameter(MODE_MEANS.clone())
        self.log_std = nn.Parameter(LOG_STD.clone())
        self.register_buffer("x_freqs", torch.tensor([] if raw_inputs else X_FREQS))
        n_in = 2 + 4 * len(self.x_freqs) + 16 + 3
        self.net = nn.Sequential(nn.Linear(n_in, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 2))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, x, t, c):
        t_f = t[:, None].float() * torch.exp(-math.log(1000) * torch.arange(8) / 8)  # (N, 8)
        x_f = (x[:, :, None] * self.x_freqs).flatten(1)                                # (N, 2 F)
        h = torch.cat([x, x_f.cos(), x_f.sin(), t_f.cos(), t_f.sin(), nn.functional.one_hot(c, 3).float()], -1)
        return mixture_eps(x, t, c, self.log_w, self.means, self.log_std) + self.net(h)  # (N, 2)


def teacher(x_t, t, c):
    """The teacher's exact eps (N, 2): what MixtureEpsNet() computes at initialisation, without its residual (zero
    there; skipping it makes a 100-step sample 7x faster)."""
    return mixture_eps(x_t, t, c, LOG_WEIGHTS, MODE_MEANS, LOG_STD)


def sample_mixture(c, gen):
    """Exact samples of the unguided teacher p(x | c) (N, 2): a mode drawn by its weight, then its Gaussian (the
    floor of tests/test_gsim.py, which runs the lesson unguided)."""
    k = torch.multinomial(CLASS_WEIGHTS[c], 1, generator=gen)[:, 0] + 4 * c          # (N,) mode index of 8
    return MODE_MEANS[k] + MODE_STD * torch.randn(len(c), 2, generator=gen)


def teacher_sample(c, cfg, gen, steps=100):
    """The guided teacher's samples: MAR's reverse diffusion over `steps` respaced steps (gaussian_diffusion.p_sample,
    posterior variance), eps guided by MARVAL Eq. 10 in MAR's convention (mar.guided_eps)."""
    diff = GaussianDiffusion(1000, str(steps))
    x = torch.randn(len(c), 2, generator=gen)
    null = torch.full_like(c, NULL)
    for k in reversed(range(steps)):
        t = torch.full((len(c),), k)
        eps = mar.guided_eps(teacher, x, diff.original_t(t), c, null, cfg)             # (N, 2)
        out = torch.cat([eps, -torch.ones_like(eps)], -1)  # variance channel -1: frac 0, the posterior variance
        x = diff.p_sample(out, x, t, torch.randn(x.shape, generator=gen))
    return x


# ==== Stage 1: GSIM, the one-step generator and its auxiliary network ==============================================

def one_step(G, c, z):
    """MARVAL's one-step generator g(z, c) with eps network G: mar.one_step_x0 (x0 from eps at t* = 400)."""
    return mar.one_step_x0(G, z, c, DIFF)


def generator_loss(G, aux, c, z, gen, cfg, r=1e-5, path_weight=1.0, flip_sign=False, detach_dprime=False):
    """GSIM's generator loss for classes c (N,) and noise z (N, 2), as distill_gsim.py computes it per token
    (`GeneratorLoss` with t_min 20, t_max 980, time weight p = 1): the student's x0 = g(z, c) noised at
    t ~ U{20..980}, the guided teacher's and the aux's eps at x_t (their parameters frozen, their input x_t keeping
    its graph to G), `gsim_generator_loss`. Every hyper-parameter is an argument:
      cfg          the teacher's CFG scale in MAR's convention (MARVAL Eq. 10 with w = cfg - 1),
      r            pseudo-Huber constant in score units (MARVAL Table 1: 1e-5),
      path_weight  1: GSIM's exact gradient; 0: SIM's loss without the path term d(y),
      flip_sign    teaching knob: y -> -y (the student is pushed away from the teacher),
      detach_dprime  teaching knob: Delta without gradient, so d(y) and d'(y) are constants."""
    x0 = one_step(G, c, z)                                                          # (N, 2), graph to G
    t = torch.randint(20, 981, (len(z),), generator=gen)                            # (N,)
    eps = torch.randn(x0.shape, generator=gen)                                      # (N, 2)
    x_t = DIFF.q_sample(x0, t, eps)                                                 # (N, 2), graph to G
    e_p = mar.guided_eps(teacher, x_t, t, c, torch.full_like(c, NULL), cfg)         # guided teacher eps (Eq. 10)
    e_a = aux(x_t, t, c)                                                            # (N, 2)
    if flip_sign:               # y -> -y
        e_p = 2 * e_a - e_p
    if detach_dprime:           # Delta = e_p - e_a with no gradient: d'(y) and d(y) become constants
        e_p = e_a + (e_p - e_a).detach()
    return gsim_generator_loss(e_p, e_a, eps, (1 - ABAR[t]).sqrt(), r, path_weight)


def gsim_iteration(G, aux, opt_g, opt_a, batch, gen, args):
    """One GSIM iteration: a generator update, then `aux_steps` DSM updates of the aux network (`aux_dsm_loss`) on
    the updated generator's samples for the same z, without their graph (distill_gsim.py uses the samples from
    before the update: one generator step apart)."""
    c, z = torch.randint(0, 2, (batch,), generator=gen), torch.randn(batch, 2, generator=gen)
    aux.requires_grad_(False)  # constants in the generator loss; its input x_t is not detached
    loss = generator_loss(G, aux, c, z, gen, args.cfg, args.r, args.path_weight, args.flip_sign, args.detach_dprime)
    opt_g.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(G.parameters(), 1.0)
    opt_g.step()
    aux.requires_grad_(True)
    with torch.no_grad():
        x0 = one_step(G, c, z)
    for _ in range(args.aux_steps):
        loss_a = aux_dsm_loss(aux, x0, c, DIFF, gen)
        opt_a.zero_grad()
        loss_a.backward()
        opt_a.step()


def run_gsim(args, gen, watch=None):
    """Stage 1: distil the guided teacher into a one-step generator for args.iters iterations; returns its EMA.
    Adam (0, 0.999) at 1e-3 for both networks, the generator's lr constant for the first half and then decaying
    linearly to 0 (the pseudo-Huber direction does not shrink near the optimum, so a constant lr to the end keeps the
    student jittering), the generator's gradient norm clipped at 1, EMA 0.99, two aux updates per generator update.
    watch(i, G_ema), if given, is called before iteration i and after the last.

    What GSIM has to learn here. Read at t* = 400, the teacher's eps gives the posterior mean (Tweedie's formula for
    a Gaussian mixture) x0 = k z + (1 - k') sum_m r_m(z) mu_m, with var = alpha^2 s^2 + sigma^2 the noised mode's
    variance (s = 0.25 the mode's width, alpha, sigma those of t* = 400), k = alpha s^2 / var = 0.13 and
    k' = alpha^2 s^2 / var = 0.10: a small multiple of z plus a convex combination of the means. The
    responsibilities r_m(z) switch from one mode to the next across a band about 1.5 wide in z (their log-odds grow
    by 2.9 per unit of z), so most of z-space lies in a switch and lands between modes, on the chord joining them. A one-step sampler needs the switch steep (the mass
    between two modes is the z-mass inside their switch) and each mode spread to the teacher's width.
    With the residuals on raw coordinates (args.raw_inputs "both" or "generator") GSIM does neither: the switch stays
    soft and the mixture part's width s shrinks (0.25 -> about 0.12; why GSIM moves it down is not derived here),
    which cuts k, the modes' own spread, fourfold while steepening the switch by only 8%. Each mode becomes nearly a
    point at a corner and the switch's mass lies on the chords: a polygon per class. With Fourier features
    (`MixtureEpsNet`) the residual makes the switch and spreads the modes (docs/results.md, section 3: the runs).
    """
    raw = {"generator": (True, False), "aux": (False, True), "both": (True, True)}.get(args.raw_inputs, (False, False))
    G, aux = MixtureEpsNet(raw_inputs=raw[0]), MixtureEpsNet(raw_inputs=raw[1])
    G_ema = copy.deepcopy(G).requires_grad_(False)
    opt_g = torch.optim.Adam(G.parameters(), lr=args.lr, betas=(0.0, 0.999))  # betas (0, 0.999): distill_gsim note 6
    opt_a = torch.optim.Adam(aux.parameters(), lr=args.lr, betas=(0.0, 0.999))
    # the generator's lr: constant for the first half, then linear to 0
    sched = torch.optim.lr_scheduler.LambdaLR(opt_g, lambda i: min(1.0, 2 - 2 * i / max(args.iters, 1)))
    for i in range(args.iters):
        if watch is not None:
            watch(i, G_ema)
        gsim_iteration(G, aux, opt_g, opt_a, args.batch, gen, args)
        sched.step()
        common.update_ema(G_ema, G, 0.99)
    if watch is not None:
        watch(args.iters, G_ema)
    return G_ema


# ==== Stage 2: reward back-propagation through the one-step generator ===============================================

# The reward: log density of a disc-shaped target N(TARGET, TARGET_STD^2 I) that overlaps the modes near it.
TARGET, TARGET_STD = torch.tensor([0.6, 0.6]), 0.35


def reward(x):
    """Differentiable reward of points x (N, 2): the target's log density, up to a constant."""
    return -(x - TARGET).square().sum(-1) / (2 * TARGET_STD ** 2)


def rl_refine(G, steps, reg_weight, batch, gen, lr=1e-3):
    """MARVAL-RL on one token: maximise mean R(g(z, c)) by gradient ascent through the one-step generator, with
    the DRaFT+ penalty beta |g(z, c) - g_frozen(z, c)|^2 for the same z and c (rl_refine.py's loss with K = 1).
    The reward's curvature is 1 / TARGET_STD^2 = 8.2 against the penalty's 2 beta = 32, so each sample's optimum
    lies 8.2 / (8.2 + 32) ~ 20% of the way to the peak. Adam at torch's default betas: no aux network here to keep
    pace with."""
    G, frozen = copy.deepcopy(G).requires_grad_(True), copy.deepcopy(G).requires_grad_(False)
    opt = torch.optim.Adam(G.parameters(), lr=lr)
    for _ in range(steps):
        c, z = torch.randint(0, 2, (batch,), generator=gen), torch.randn(batch, 2, generator=gen)
        x0 = one_step(G, c, z)
        with torch.no_grad():
            ref = one_step(frozen, c, z)
        loss = -reward(x0).mean() + reg_weight * (x0 - ref).square().sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return G.requires_grad_(False)


# ==== Measures: distance to the teacher against the floor, mode masses =============================================

def energy_distance(a, b):
    """2 E|a - b| - E|a - a'| - E|b - b'| of two sample sets (N, 2), as a V-statistic (pairs i = j included): two
    sets of one law score about 2 E|X - X'| / N, not 0, which is why the lesson reports multiples of that floor."""
    return (2 * torch.cdist(a, b).mean() - torch.cdist(a, a).mean() - torch.cdist(b, b).mean()).item()


def sliced_w2(a, b, n_dirs=256):
    """Sliced 2-Wasserstein distance of two equal-size sample sets over n_dirs evenly spaced directions."""
    ang = torch.arange(n_dirs) * math.pi / n_dirs
    dirs = torch.stack([ang.cos(), ang.sin()], 1)                                   # (n_dirs, 2)
    pa, pb = (a @ dirs.T).sort(0).values, (b @ dirs.T).sort(0).values               # (N, n_dirs) each
    return (pa - pb).square().mean().sqrt().item()


def per_class(metric, x, ref, c):
    """A metric averaged over the two classes; x and ref hold the same classes `c` in the same order."""
    return sum(metric(x[c == k], ref[c == k]) for k in range(2)) / 2


SETS, FLOOR_SETS = 4, 8  # sets of student samples behind each distance; sets of teacher samples behind the floor


def distances(xs, refs, c):
    """Energy distance and sliced W2 of sample sets xs[k] to refs[k] (each (N, 2), classes c), averaged over k."""
    return {m: sum(per_class(f, x, ref, c) for x, ref in zip(xs, refs)) / len(xs)
            for m, f in (("ed", energy_distance), ("sw", sliced_w2))}


def floor_of(refs, c):
    """The floor: what `distances` gives, on average, for two independent sets of teacher samples; refs is a list of
    such sets. The energy distance is a V-statistic, whose mean for two sets of N and M samples of one law is
    E|X - X'| (1/N + 1/M): estimated from the distances between every pair of sets it is steady to 0.3%, while one
    pair's own energy distance lies anywhere from about 0.5x to 2x of it. Sliced W2 has no such formula: its floor
    is the mean over every pair. Returns the floor and each pair's `distances`."""
    pairs = [(a, b) for i, a in enumerate(refs) for b in refs[i + 1:]]
    mean_ed = [per_class(lambda a, b: torch.cdist(a, b).mean().item() * (1 / len(a) + 1 / len(b)), a, b, c)
               for a, b in pairs]
    each = [distances([a], [b], c) for a, b in pairs]
    return {"ed": sum(mean_ed) / len(pairs), "sw": sum(p["sw"] for p in each) / len(pairs)}, each


def own_mode_distances(x, c):
    """Distance of each sample x (N, 2) of classes c (N,) to each of its own class's four mode means: (N, 4)."""
    return (x[:, None] - MODE_MEANS.reshape(2, 4, 2)[c]).norm(dim=-1)               # means of class c: (N, 4, 2)


def mode_masses(x, c):
    """Share of each class's samples nearest to each of its own four modes: (2, 4)."""
    nearest = own_mode_distances(x, c).argmin(1)                                    # (N,)
    return torch.stack([torch.bincount(nearest[c == k], minlength=4).float() / int((c == k).sum()) for k in (0, 1)])


def between_modes(x, c):
    """Share of the samples x (N, 2) of classes c farther than 2.5 MODE_STD from every mode of their class: the mass
    on the bridges between modes, plus the modes' own tails (4.4% of one Gaussian mode of width MODE_STD; compare
    the teacher's share)."""
    return (own_mode_distances(x, c).min(1).values > 2.5 * MODE_STD).float().mean().item()


def student_sample(G, c, seed):
    with torch.no_grad():
        return one_step(G, c, torch.randn(len(c), 2, generator=torch.Generator().manual_seed(seed)))


# ==== The figure ===================================================================================================

COLORS = ("tab:blue", "tab:red")  # class 0, class 1
LIM = (-2, 2)                      # every scatter panel: the same square window, equal aspect


def scatter(ax, x, c, title, note=""):
    """Points x (N, 2) coloured by class on a matplotlib axes, the eight mode means (crosses), the reward's 1- and
    2-sigma circles (dashed, drawn over the points), a title and a note of numbers under it."""
    import matplotlib.patches as patches
    for k in (0, 1):
        pts = x[c == k]
        ax.scatter(pts[:, 0], pts[:, 1], s=1, color=COLORS[k], alpha=0.5, rasterized=True, label=f"class {k}")
    ax.scatter(MODE_MEANS[:, 0], MODE_MEANS[:, 1], marker="x", s=18, color="black", linewidths=0.8,
               label="mode means")
    for k in (1, 2):
        ax.add_patch(patches.Circle(TARGET.tolist(), k * TARGET_STD, fill=False, color="0.2", ls="--", lw=0.9,
                                    zorder=3, label="reward: 1, 2 sigma" if k == 1 else None))
    ax.set(xlim=LIM, ylim=LIM, aspect="equal", xlabel="x1", title=title)
    ax.set_xticks([-2, -1, 0, 1, 2])
    ax.set_yticks([-2, -1, 0, 1, 2])
    ax.title.set_fontsize(9)
    ax.grid(True, alpha=0.25)
    ax.text(0.5, -0.3, note, transform=ax.transAxes, ha="center", va="top", fontsize=8)


def save_figure(panels, history, masses, path, floor_range):
    """One PNG. Top row: scatter panels [(title, samples (N, 2), classes (N,), note)], all on the same [-2, 2]^2
    window. Bottom left: the student's distance to the teacher against GSIM iterations in multiples of the floor
    (log scale; 1 is the floor), with floor_range (lowest, highest) the energy distance of single pairs of teacher
    sets over the floor, shaded. Bottom right: each class's mode masses, masses = {name: (2, 4)} (the weights GSIM
    must keep, RL may move)."""
    plt = figures.pyplot()
    n = len(panels)
    fig = plt.figure(figsize=(2.6 * n, 6.6))
    rows = fig.add_gridspec(2, 1, height_ratios=(1, 0.8), hspace=0.55)
    top = rows[0].subgridspec(1, n, wspace=0.3)
    bottom = rows[1].subgridspec(1, 3, width_ratios=(3, 2, 2), wspace=0.3)  # the curve, then class 0's and 1's bars
    for i, (title, x, c, note) in enumerate(panels):
        ax = fig.add_subplot(top[0, i])
        scatter(ax, x, c, title, note)
        if i == 0:
            ax.set_ylabel("x2")
            from matplotlib.lines import Line2D  # legend stand-ins: the 1-point class dots would be invisible in it
            handles, labels = ax.get_legend_handles_labels()
            handles[:2] = [Line2D([], [], ls="", marker="o", ms=5, color=COLORS[k]) for k in (0, 1)]
            fig.legend(handles, labels, loc="upper center", ncol=4, fontsize=8, bbox_to_anchor=(0.5, 0.97))
    ax = fig.add_subplot(bottom[0, 0])
    it = [h["iter"] for h in history]
    ax.plot(it, [h["ed_over_floor"] for h in history], "o-", ms=3, label="energy distance / its floor")
    ax.plot(it, [h["sw_over_floor"] for h in history], "s-", ms=3, label="sliced W2 / its floor")
    ax.axhline(1, color="gray", ls="--", lw=1, label="the floor: two sets of teacher samples (mean)")
    ax.axhspan(*floor_range, color="gray", alpha=0.15, lw=0,
               label=f"one pair of teacher sets (the curve averages {SETS} pairs)")
    end = history[-1]
    ax.annotate(f"{end['ed_over_floor']:.2f}x", (end["iter"], end["ed_over_floor"]), textcoords="offset points",
                xytext=(-10, 8), fontsize=8)
    ax.annotate(f"{end['sw_over_floor']:.2f}x", (end["iter"], end["sw_over_floor"]), textcoords="offset points",
                xytext=(-10, -12), fontsize=8)
    ax.set(yscale="log", xlabel="GSIM iteration", ylabel="distance to the teacher / floor",
           title="GSIM: the one-step student's distance to the teacher (EMA weights)")
    ax.title.set_fontsize(9)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=7)
    width = 0.8 / len(masses)
    for cls in (0, 1):
        ax = fig.add_subplot(bottom[0, 1 + cls])
        for j, (name, m) in enumerate(masses.items()):
            ax.bar([k + (j - (len(masses) - 1) / 2) * width for k in range(4)], m[cls], width, label=name)
        degrees = [round(float(a) * 180 / math.pi) for a in ANGLES[cls]]
        ax.set(xticks=range(4), xticklabels=[f"{d} deg\n(w {w:.2f})" for d, w in zip(degrees, CLASS_WEIGHTS[cls])],
               ylim=(0, 1.05), title=f"class {cls}: share of samples nearest each mode", xlabel="mode: angle (weight)")
        ax.set_ylabel("share of the class's samples" if cls == 0 else "")
        ax.title.set_fontsize(9)
        ax.grid(True, axis="y", alpha=0.25)
        if cls == 1:
            ax.legend(fontsize=7, loc="upper right")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


# ==== Main ========================================================================================================

def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", required=True, help="where marval_2d.png and report.json go")
    p.add_argument("--iters", type=common.COUNT0, default=3000, help="GSIM iterations (0: the one-step start)")
    p.add_argument("--batch", type=common.COUNT, default=512)
    p.add_argument("--lr", type=common.POSITIVE, default=1e-3, help="Adam lr of the generator and the aux network")
    p.add_argument("--cfg", type=common.NONNEG, default=1.2, help="the teacher's CFG scale (MAR's convention)")
    p.add_argument("--r", type=common.POSITIVE, default=1e-5, help="pseudo-Huber constant, score units")
    p.add_argument("--path-weight", type=common.NONNEG, default=1.0, help="1: GSIM; 0: SIM's loss")
    p.add_argument("--flip-sign", action="store_true", help="y -> -y in the generator loss")
    p.add_argument("--detach-dprime", action="store_true", help="no gradient through Delta (d'(y) detached)")
    p.add_argument("--raw-inputs", choices=("generator", "aux", "both"), default=None,
                   help="these eps networks' residuals read raw x, no Fourier features (generator, both: polygons)")
    p.add_argument("--aux-steps", type=common.COUNT, default=2, help="aux DSM updates per generator update")
    p.add_argument("--rl-steps", type=common.COUNT, default=300)
    p.add_argument("--reg-weight", type=common.NONNEG, default=16.0, help="DRaFT+ penalty of the penalised RL run")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    c = torch.arange(4000) % 2
    # The floor: how far apart two independent sets of 4,000 teacher samples are (floor_of, over every pair of
    # FLOOR_SETS sets). The student: SETS sets of its samples, each against one teacher set, averaged.
    refs = [teacher_sample(c, args.cfg, gen) for _ in range(FLOOR_SETS)]
    floor, pairs = floor_of(refs, c)

    history, snapshots = [], {}
    marks = {0, args.iters // 10, args.iters // 2, args.iters}

    def watch(i, G_ema):  # the student's distance to the teacher, in multiples of the floor, along the run
        if i in marks or i % max(1, args.iters // 15) == 0:
            xs = [student_sample(G_ema, c, seed=1 + k) for k in range(SETS)]
            d = distances(xs, refs[:SETS], c)
            history.append({"iter": i, "ed_over_floor": d["ed"] / floor["ed"], "sw_over_floor": d["sw"] / floor["sw"]})
            if i in marks:
                snapshots[i] = xs

    G_ema = run_gsim(args, gen, watch)
    student = G_ema
    x_student = snapshots[args.iters][0]
    rl = {beta: rl_refine(student, args.rl_steps, beta, args.batch, gen) for beta in (args.reg_weight, 0.0)}
    x_rl = {beta: student_sample(net, c, seed=1) for beta, net in rl.items()}
    end = history[-1]
    report = {
        "ed_over_floor": end["ed_over_floor"], "sw_over_floor": end["sw_over_floor"],
        "ed_over_floor_start": history[0]["ed_over_floor"], "floor": floor, "history": history,
        "floor_pairs_over_floor": [{m: p[m] / floor[m] for m in p} for p in pairs],
        "mode_masses": {"true": CLASS_WEIGHTS.tolist(),
                        "teacher": mode_masses(torch.cat(refs), c.repeat(FLOOR_SETS)).tolist(),
                        "student": mode_masses(torch.cat(snapshots[args.iters]), c.repeat(SETS)).tolist(),
                        "rl_penalised": mode_masses(x_rl[args.reg_weight], c).tolist(),
                        "rl_unpenalised": mode_masses(x_rl[0.0], c).tolist()},
        "between_modes": {"teacher": between_modes(torch.cat(refs), c.repeat(FLOOR_SETS)),
                          "student": between_modes(torch.cat(snapshots[args.iters]), c.repeat(SETS))},
        "student_mode_std": student.log_std[:2].exp().tolist(),  # the mixture part's width per class (teacher 0.25)
        "reward_before": reward(x_student).mean().item(), "reward_after": reward(x_rl[args.reg_weight]).mean().item(),
        "reward_after_unpenalised": reward(x_rl[0.0]).mean().item(), "settings": vars(args)}
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=2)

    ed = {h["iter"]: h["ed_over_floor"] for h in history}
    panels = [(f"teacher: 100 steps, cfg {args.cfg:g}", refs[0], c, "what GSIM distils (its samples)")]
    panels += [(f"student, GSIM iteration {i}", snapshots[i][0], c, f"energy distance {ed[i]:.2f}x the floor")
               for i in sorted(snapshots)]
    panels += [(f"after RL, penalty {args.reg_weight:g}", x_rl[args.reg_weight], c,
                f"reward {report['reward_after']:.2f} (student {report['reward_before']:.2f})"),
               ("after RL, no penalty", x_rl[0.0], c,
                f"reward {report['reward_after_unpenalised']:.2f}: on the peak")]
    mm = report["mode_masses"]
    masses = {"teacher": mm["teacher"], "student": mm["student"], f"RL, penalty {args.reg_weight:g}":
              mm["rl_penalised"], "RL, no penalty": mm["rl_unpenalised"]}
    spread = [p["ed"] for p in report["floor_pairs_over_floor"]]
    save_figure(panels, history, masses, os.path.join(args.out_dir, "marval_2d.png"), (min(spread), max(spread)))
    print(f"GSIM: energy distance {history[0]['ed_over_floor']:.1f}x -> {end['ed_over_floor']:.2f}x the floor, "
          f"sliced W2 {end['sw_over_floor']:.2f}x; RL reward {report['reward_before']:.3f} -> "
          f"{report['reward_after']:.3f} (penalty {args.reg_weight:g}), {report['reward_after_unpenalised']:.3f} "
          f"(none); -> {args.out_dir}")
    return report


if __name__ == "__main__":
    common.cli(main)
