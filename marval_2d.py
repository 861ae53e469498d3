"""MARVAL in two dimensions: the whole method on one 2-D "token", in about two minutes on a 2-core CPU.

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
     floor: how far apart two sets of teacher samples are. The generator trains the residual of its eps network and
     keeps the teacher's mixture part: trained, the mixture's width shrinks and the student becomes a polygon per
     class (`run_gsim` says why; --train-student-mixture shows it).
  3. Stage 2, RL: a reward (the log density of a target disc that overlaps some modes) back-propagated through the
     one-step generator, with and without the DRaFT+ penalty toward the frozen student: without it every sample
     piles onto the reward's peak (reward hacking); with it the student moves less.

Writes OUT_DIR/marval_2d.png (teacher, student during GSIM, after RL with / without the penalty on one [-2, 2]^2
window; distance to the floor against iterations; class 0's mode masses) and OUT_DIR/report.json (`ed_over_floor`,
`reward_before`, `reward_after`, mode masses).

    python marval_2d.py --out-dir runs/2d
    python marval_2d.py --out-dir runs/2d_sim --path-weight 0      # SIM's loss (no path term): a biased gradient

Knobs, and what a student of the course sees (measured; the numbers: docs/results.md, section 3):
  --path-weight 0     SIM's loss without the path term d(y): a biased gradient.
  --flip-sign         y -> -y: GSIM drives the student away from the teacher; each class collapses onto one mode.
  --detach-dprime     Delta without gradient, so d(y) and d'(y) are constants and only eps_phi(x_t) in the
                      projection term carries one (tests/test_gsim.py's 1-D "detached").
  --train-student-mixture  the generator trains its mixture part too: each class becomes a polygon (`run_gsim`).
  --aux-steps 1       one aux update per generator update.
  --cfg 2             a stronger guidance: the teacher's modes sharpen and its weakest mode nearly vanishes.
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


class MixtureEpsNet(nn.Module):
    """eps(x_t, t, c): the mixture's exact eps with trainable log-weights, means and widths, plus an MLP residual on
    [x_t, sinusoidal(t), one-hot c] whose last layer starts at zero. At initialisation it IS the teacher: MARVAL
    initialises the student and the auxiliary network as full copies of the teacher's head. The aux network trains
    every parameter (freezing its mixture part stalls: a smooth residual hardly moves the sharp switch between modes
    that the mixture part puts in eps); the one-step generator trains its residual only (`run_gsim`: why)."""

    def __init__(self, width=128):
        super().__init__()
        self.log_w, self.means = nn.Parameter(LOG_WEIGHTS.clone()), nn.Parameter(MODE_MEANS.clone())
        self.log_std = nn.Parameter(torch.full((3,), math.log(MODE_STD)))
        self.net = nn.Sequential(nn.Linear(2 + 16 + 3, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 2))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, x, t, c):
        freqs = t[:, None].float() * torch.exp(-math.log(1000) * torch.arange(8) / 8)  # (N, 8)
        h = torch.cat([x, freqs.cos(), freqs.sin(), nn.functional.one_hot(c, 3).float()], -1)
        return mixture_eps(x, t, c, self.log_w, self.means, self.log_std) + self.net(h)  # (N, 2)


TEACHER = MixtureEpsNet().requires_grad_(False)  # the exact mixture (its residual is zero)


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
        eps = mar.guided_eps(TEACHER, x, diff.original_t(t), c, null, cfg)             # (N, 2)
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
    e_p = mar.guided_eps(TEACHER, x_t, t, c, torch.full_like(c, NULL), cfg)         # guided teacher eps (Eq. 10)
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
    Adam (0, 0.999) at 1e-3 for both networks, the generator's lr decaying linearly to 0 (the pseudo-Huber direction
    does not shrink near the optimum, so a constant lr keeps the student jittering), EMA 0.99, two aux updates per
    generator update. watch(i, G_ema), if given, is called before iteration i and after the last.

    The generator trains its MLP residual; its mixture part keeps the teacher's weights, means and widths (unless
    args.train_student_mixture). Why: read at t* = 400 the mixture part gives x0 = k z + (1 - k') sum_m r_m(z) mu_m,
    a small multiple of z plus a convex combination of the means with soft responsibilities r_m(z), and one width
    per class sets both how wide each mode is (k = a s^2 / (a^2 s^2 + sigma^2)) and how soft the switch between modes
    is. Trained by GSIM, that width is among the first things to move, and it shrinks (0.25 -> 0.16 in 1,500
    iterations): the student's modes become points at the corners of its class's polygon and the mass lies on the
    convex combinations between them, the polygons' edges. The residual, left alone, widens the modes instead
    (docs/results.md, section 3: the runs that showed it; at cfg 1 the fully trained network, given 3,000
    iterations, ends closer to the teacher, so the choice is measured for this lesson's cfg 1.2 only)."""
    G, aux = MixtureEpsNet(), MixtureEpsNet()
    G_ema = copy.deepcopy(G).requires_grad_(False)
    if not args.train_student_mixture:
        for p in (G.log_w, G.means, G.log_std):
            p.requires_grad_(False)
    opt_g = torch.optim.Adam([p for p in G.parameters() if p.requires_grad], lr=args.lr,
                             betas=(0.0, 0.999))                          # betas (0, 0.999): distill_gsim note 6
    opt_a = torch.optim.Adam(aux.parameters(), lr=args.lr, betas=(0.0, 0.999))
    sched = torch.optim.lr_scheduler.LambdaLR(opt_g, lambda i: 1 - i / max(args.iters, 1))
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
    The reward's curvature is 1 / (2 TARGET_STD^2) = 4.1, so at beta = 16 each sample's optimum lies ~20% of the
    way to the peak. Adam at torch's default betas: no aux network here to keep pace with."""
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


def mode_masses(x, c):
    """Share of each class's samples nearest to each of its own four modes: (2, 4)."""
    out = torch.zeros(2, 4)
    for k in range(2):
        nearest = (x[c == k][:, None] - MODE_MEANS[4 * k: 4 * k + 4][None]).norm(dim=-1).argmin(1)
        out[k] = torch.bincount(nearest, minlength=4).float() / int((c == k).sum())
    return out


def student_sample(G, c, seed):
    with torch.no_grad():
        return one_step(G, c, torch.randn(len(c), 2, generator=torch.Generator().manual_seed(seed)))


# ==== The figure ===================================================================================================

COLORS = ("tab:blue", "tab:red")  # class 0, class 1
LIM = (-2, 2)                      # every scatter panel: the same square window, equal aspect


def scatter(ax, x, c, title, note=""):
    """Points x (N, 2) coloured by class on a matplotlib axes, the eight mode means (crosses), the reward's 1- and
    2-sigma circles (grey, dashed), a title and a note of numbers under it."""
    import matplotlib.patches as patches
    for k in (0, 1):
        pts = x[c == k]
        ax.scatter(pts[:, 0], pts[:, 1], s=1, color=COLORS[k], alpha=0.5, rasterized=True, label=f"class {k}")
    ax.scatter(MODE_MEANS[:, 0], MODE_MEANS[:, 1], marker="x", s=18, color="black", linewidths=0.8,
               label="mode means")
    for k in (1, 2):
        ax.add_patch(patches.Circle(TARGET.tolist(), k * TARGET_STD, fill=False, color="gray", ls="--", lw=0.8,
                                    label="reward: 1, 2 sigma" if k == 1 else None))
    ax.set(xlim=LIM, ylim=LIM, aspect="equal", xlabel="x1", title=title)
    ax.set_xticks([-2, -1, 0, 1, 2])
    ax.set_yticks([-2, -1, 0, 1, 2])
    ax.title.set_fontsize(9)
    ax.grid(True, alpha=0.25)
    ax.text(0.5, -0.3, note, transform=ax.transAxes, ha="center", va="top", fontsize=8)


def save_figure(panels, history, masses, path):
    """One PNG. Top row: scatter panels [(title, samples (N, 2), classes (N,), note)], all on the same [-2, 2]^2
    window. Bottom left: the student's distance to the teacher against GSIM iterations in multiples of the floor
    (log scale; 1 is the floor). Bottom right: class 0's mode masses (the weights GSIM must keep, RL may move)."""
    plt = figures.pyplot()
    n = len(panels)
    fig = plt.figure(figsize=(2.6 * n, 6.6))
    grid = fig.add_gridspec(2, n, height_ratios=(1, 0.8), hspace=0.55, wspace=0.3)
    for i, (title, x, c, note) in enumerate(panels):
        ax = fig.add_subplot(grid[0, i])
        scatter(ax, x, c, title, note)
        if i == 0:
            ax.set_ylabel("x2")
            from matplotlib.lines import Line2D  # legend stand-ins: the 1-point class dots would be invisible in it
            handles, labels = ax.get_legend_handles_labels()
            handles[:2] = [Line2D([], [], ls="", marker="o", ms=5, color=COLORS[k]) for k in (0, 1)]
            fig.legend(handles, labels, loc="upper center", ncol=4, fontsize=8, bbox_to_anchor=(0.5, 0.97))
    half = n // 2 + 1
    ax = fig.add_subplot(grid[1, :half])
    it = [h["iter"] for h in history]
    ax.plot(it, [h["ed_over_floor"] for h in history], "o-", ms=3, label="energy distance / its floor")
    ax.plot(it, [h["sw_over_floor"] for h in history], "s-", ms=3, label="sliced W2 / its floor")
    ax.axhline(1, color="gray", ls="--", lw=1, label="the floor: two sets of teacher samples")
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
    ax = fig.add_subplot(grid[1, half + 1:])
    width = 0.8 / len(masses)
    for j, (name, m) in enumerate(masses.items()):
        ax.bar([k + (j - (len(masses) - 1) / 2) * width for k in range(4)], m[0], width, label=name)
    ax.set(xticks=range(4), xticklabels=[f"mode {k}\n(weight {w:.1f})" for k, w in enumerate(CLASS_WEIGHTS[0])],
           ylabel="share of class 0's samples", ylim=(0, 1), title="class 0: share of samples nearest each mode")
    ax.title.set_fontsize(9)
    ax.grid(True, axis="y", alpha=0.25)
    ax.legend(fontsize=7)
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
    p.add_argument("--train-student-mixture", action="store_true",
                   help="the generator trains its mixture part too (weights, means, widths): the polygons")
    p.add_argument("--aux-steps", type=common.COUNT, default=2, help="aux DSM updates per generator update")
    p.add_argument("--rl-steps", type=common.COUNT, default=300)
    p.add_argument("--reg-weight", type=common.NONNEG, default=16.0, help="DRaFT+ penalty of the penalised RL run")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    n = 4000
    c = torch.arange(n) % 2
    # the floor: two independent teacher sample sets are this far apart
    ref, ref2 = teacher_sample(c, args.cfg, gen), teacher_sample(c, args.cfg, gen)
    floor = {"ed": per_class(energy_distance, ref2, ref, c), "sw": per_class(sliced_w2, ref2, ref, c)}

    history, snapshots = [], {}
    marks = {0, args.iters // 10, args.iters // 2, args.iters}

    def watch(i, G_ema):  # the student's distance to the teacher, in multiples of the floor, along the run
        if i in marks or i % max(1, args.iters // 15) == 0:
            x = student_sample(G_ema, c, seed=1)
            history.append({"iter": i, "ed_over_floor": per_class(energy_distance, x, ref, c) / floor["ed"],
                            "sw_over_floor": per_class(sliced_w2, x, ref, c) / floor["sw"]})
            if i in marks:
                snapshots[i] = x

    G_ema = run_gsim(args, gen, watch)
    student = G_ema
    x_student = snapshots[args.iters]
    rl = {beta: rl_refine(student, args.rl_steps, beta, args.batch, gen) for beta in (args.reg_weight, 0.0)}
    x_rl = {beta: student_sample(net, c, seed=1) for beta, net in rl.items()}
    end = history[-1]
    report = {
        "ed_over_floor": end["ed_over_floor"], "sw_over_floor": end["sw_over_floor"],
        "ed_over_floor_start": history[0]["ed_over_floor"], "floor": floor, "history": history,
        "mode_masses": {"true": CLASS_WEIGHTS.tolist(), "teacher": mode_masses(ref, c).tolist(),
                        "student": mode_masses(x_student, c).tolist(),
                        "rl_penalised": mode_masses(x_rl[args.reg_weight], c).tolist(),
                        "rl_unpenalised": mode_masses(x_rl[0.0], c).tolist()},
        "reward_before": reward(x_student).mean().item(), "reward_after": reward(x_rl[args.reg_weight]).mean().item(),
        "reward_after_unpenalised": reward(x_rl[0.0]).mean().item(), "settings": vars(args)}
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=2)

    ed = {h["iter"]: h["ed_over_floor"] for h in history}
    panels = [(f"teacher: 100 steps, cfg {args.cfg:g}", ref, c, "what GSIM distils (its samples)")]
    panels += [(f"student, GSIM iteration {i}", snapshots[i], c, f"energy distance {ed[i]:.2f}x the floor")
               for i in sorted(snapshots)]
    panels += [(f"after RL, penalty {args.reg_weight:g}", x_rl[args.reg_weight], c,
                f"reward {report['reward_after']:.2f} (student {report['reward_before']:.2f})"),
               ("after RL, no penalty", x_rl[0.0], c,
                f"reward {report['reward_after_unpenalised']:.2f}: on the peak")]
    mm = report["mode_masses"]
    masses = {"teacher": mm["teacher"], "student": mm["student"], f"RL, penalty {args.reg_weight:g}":
              mm["rl_penalised"], "RL, no penalty": mm["rl_unpenalised"]}
    save_figure(panels, history, masses, os.path.join(args.out_dir, "marval_2d.png"))
    print(f"GSIM: energy distance {history[0]['ed_over_floor']:.1f}x -> {end['ed_over_floor']:.2f}x the floor, "
          f"sliced W2 {end['sw_over_floor']:.2f}x; RL reward {report['reward_before']:.3f} -> "
          f"{report['reward_after']:.3f} (penalty {args.reg_weight:g}), {report['reward_after_unpenalised']:.3f} "
          f"(none); -> {args.out_dir}")
    return report


if __name__ == "__main__":
    common.cli(main)
