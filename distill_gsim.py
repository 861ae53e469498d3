"""Stage 1 of MARVAL (Gu et al. 2025, arXiv:2511.15190): Guided Score Implicit Matching (GSIM).

MAR's diffusion head turns each token's condition c (from the masked transformer) into a token by ~100 reverse
diffusion steps. GSIM distills those 100 steps into ONE: the student head g_theta reads z ~ N(0, I) as x_400 and
returns its x0 prediction (`mar.one_step_x0`), and it is trained so that its per-token distribution
matches the CFG-guided teacher's, while MAR's outer AR loop is kept unchanged.

Three networks (all copies of the teacher's head at the start):
  * teacher p: the frozen MAR (EMA weights); its guided eps eps_p = eps(c_null) + cfg (eps(c) - eps(c_null)),
  * student theta: the one-step generator (MAR checkpoint format: teacher transformer + student head),
  * auxiliary phi: a diffusion model of the STUDENT's own tokens, trained by denoising score matching; it stands in
    for the student's intractable score s_q (SIM, Luo et al. 2024, arXiv:2410.16794).

One iteration on a batch of real latents (only used to build realistic contexts: the losses are data-free):
  1. random order and mask; the frozen transformer gives c (class) and c_null (fake_latent) for the masked tokens,
  2. student: x0 = g_theta(z, c) for every masked token (diffusion_batch_mul draws each),
  3. x_t = alpha_t x0 + sigma_t eps with t ~ U{t_min..t_max},
  4. generator loss `gsim_generator_loss` (docs/derivation.md section 4) with gradients through x_t into the frozen
     teacher and aux,
  5. `aux_steps` DSM updates of phi on the detached student tokens, 6. EMA of theta.

Reads --teacher (MAR checkpoint) and the data (as train_mar.py). Writes to --out-dir checkpoint-last.pth
({model, model_ema}: the student as a MAR that sample.py / rl_refine.py load like any MAR; plus aux, optimizers,
step, args), log.jsonl, and for the toy eval.json (teacher vs student toy FID / accuracy / speed) and grids.

    # toy, CPU, a few minutes (after train_mar.py --preset toy)
    python distill_gsim.py --preset toy --teacher runs/toy_teacher/checkpoint-last.pth --out-dir runs/toy_student
    # ImageNet, 8 GPUs (paper: 64 per GPU on 8 GPUs, 30 epochs). --grad-checkpointing keeps MAR-H at 64 per GPU
    # within an 80 GB GPU (docs/results.md, section 4: the dry run of this step)
    torchrun --nproc_per_node=8 distill_gsim.py --teacher mar_huge/checkpoint-last.pth --vae kl16.ckpt \
        --data-path IMAGENET/train --model mar_huge --grad-checkpointing --out-dir runs/marval_huge
    # 1 GPU: the same 64 per GPU (the global batch is per GPU x GPUs)
    python distill_gsim.py --teacher mar_base/checkpoint-last.pth --vae kl16.ckpt --data-path IMAGENET/train \
        --model mar_base --global-batch-size 64 --grad-checkpointing --out-dir runs/marval_base
    # CPU smoke run
    python distill_gsim.py --preset toy --teacher runs/toy_teacher/checkpoint-last.pth --max-steps 5 --eval-images 0 \
        --out-dir runs/smoke_gsim

Deliberate choices where the paper is silent or ambiguous (each is a flag):
  1. CFG convention: MARVAL Eq. 10 writes the guided score (1+w) s(c) - w s(null), which is MAR's cfg = 1 + w = 2.2
     for w = 1.2; its ablation calls w = 1 "no CFG" and its IS at w = 1 matches MAR-B without CFG, which reads as
     MAR's own convention cfg = w. --teacher-cfg is MAR's cfg and defaults to 1.2 (the ablation reading). The
     scale is the same for every context (the paper gives one); MAR samples with it ramped linearly over the AR
     steps, which --teacher-cfg-schedule linear imitates by each batch's mask ratio (`gsim_step`).
  2. Time weight w(t) = sigma_t^p of the score-space divergence and t ~ U{20..980}, neither stated in the paper:
     t near 0 has Delta ~ 0 (a noise direction), t near 999 has alpha ~ 5e-5 (no signal). p = 1
     (--time-weight-power) is the eps form of docs/derivation.md, every t weighted alike in eps units; the toy uses
     p = 3 (eps-unit factor sigma_t^2 = 1 - abar_t), the best of the weights measured on the digits (docs/results.md,
     section 8). A reading of those measurements, not a proof: a low p over-weights the small-t end, where Delta is
     mostly noise.
  3. Two aux steps per generator step (on the digits toy 1:1 kept FID but lost recall on every seed set, docs/results.md
     section 8).
  4. Head-only distillation by default (transformer frozen, c shared by all three heads); --train-transformer
     also trains a student copy of the transformer.
  5. Masking ratios: MAR's truncated Gaussian mixed with uniform ratios (--uniform-mask-prob) so the student also
     sees the mostly-visible contexts of late AR steps.
  6. Adam betas (0, 0.999) as in the SiD/SIM lineage; the paper says AdamW lr 5e-6 without betas.
  7. Precision: --precision bf16 (GPU default) runs the transformer, the student head and the aux DSM under bf16
     autocast, but the teacher and aux head calls of the generator loss, Delta and the loss in fp32: the
     pseudo-Huber gradient keeps only Delta / |Delta|, which bf16 rounding of eps_p and eps_phi loses as the student
     converges (test_distill.py checks the direction under autocast).
"""
import argparse
import copy
import json
import os
import random
from types import SimpleNamespace

import torch
import torch.nn.functional as F

import data
import common
import evaluate
import figures
import mar

# ----------------------------------------------------------------------------------------------------------------
# The GSIM losses (copyable: torch only)
# ----------------------------------------------------------------------------------------------------------------


def gsim_generator_loss(eps_teacher, eps_aux, noise, sigma, r=1e-5, path_weight=1.0, weight=None):
    """MARVAL's GSIM generator loss in eps form (docs/derivation.md section 4), averaged over tokens.

    eps_teacher: guided teacher eps at x_t (N, D); eps_aux: auxiliary eps at x_t (N, D); both must still carry the
    graph back to x_t (network PARAMETERS frozen, INPUTS not detached). noise: the eps that made x_t (N, D).
    sigma: sqrt(1 - alpha_bar_t), broadcastable to (N, 1). r: pseudo-Huber constant in SCORE units (MARVAL
    Table 1: 1e-5), hence sigma * r in eps units.

    With Delta = eps_p - eps_phi (the score difference y = s_phi - s_p = Delta / sigma) the per-token loss is
        sigma L = <Delta, eps_phi - eps> / sqrt(|Delta|^2 + sigma^2 r^2)        score-projection term (MARVAL A.10)
                + path_weight * (sqrt(|Delta|^2 + sigma^2 r^2) - sigma r)       path term d(y)        (MARVAL A.11)
    i.e. sigma * [ d(y) - d'(y)^T (s_phi - grad log p(x_t | x0)) ] with pseudo-Huber d(y) = sqrt(|y|^2 + r^2) - r.
    Its gradient equals the gradient of the divergence E d(s_q - s_p) (SIM's theorem, Luo et al. 2024); d'(y) is
    NOT detached (detaching it, or dropping the path term, gives a wrong gradient: tests/test_gsim.py checks the
    1-D case against finite differences). path_weight = 0 is the SIM paper's loss. Norms in fp32: bf16's 8-bit
    mantissa loses a well-trained student's small Delta. weight: optional (N,) factors on the per-token losses before
    the mean (--time-weight-power: sigma^(p - 1), i.e. w(t) = sigma_t^p in score units; None is w(t) = sigma_t)."""
    # Paper names: s = -eps_hat / sigma (a score from an eps prediction); s_p the guided teacher score (MARVAL Eq. 10),
    # s_q the student's score, estimated by the aux head's s_phi; y = s_q - s_p ~ s_phi - s_p = delta / sigma.
    dt = torch.promote_types(eps_teacher.dtype, torch.float32)            # at least fp32 (bf16 in -> fp32)
    delta = (eps_teacher - eps_aux).to(dt)                                 # (N, D): sigma * y
    sigma_r = (torch.as_tensor(sigma, dtype=dt, device=delta.device).reshape(-1) * r).expand(len(delta))  # (N,)
    norm = (delta.square().sum(-1) + sigma_r.square()).sqrt()              # (N,): sigma * sqrt(|y|^2 + r^2)
    d_y = norm - sigma_r                                                   # (N,): sigma * d(y), pseudo-Huber
    # sigma * (-d'(y)^T (s_phi - grad log p(x_t | x0))), with d'(y) = delta / norm and
    # s_phi - grad log p(x_t | x0) = (eps - eps_phi) / sigma: the score-projection term (MARVAL A.10)
    projection = (delta * (eps_aux.to(dt) - noise.to(dt))).sum(-1) / norm  # (N,)
    per_token = projection + path_weight * d_y                             # (N,)
    return (per_token if weight is None else per_token * weight.to(dt)).mean()


def aux_dsm_loss(aux_net, x0, c, diffusion, generator=None):
    """Denoising score matching of the auxiliary head on (detached) student tokens x0 (N, D), t ~ U{0..999}:

        E_{t, eps} |eps_phi(x_t, t, c) - eps|^2,   x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps   (DDPM Eq. 14, L_simple)

    mean over the D values and the tokens (MAR's MSE term, without the variance term: phi only needs eps, i.e. the
    score s_phi = -eps_phi / sigma that stands in for the student's s_q in SIM's theorem)."""
    t = mar.randint(0, diffusion.num_timesteps, (len(x0),), generator, x0.device)
    eps = mar.randn(x0.shape, generator, x0.device)
    out = aux_net(diffusion.q_sample(x0, t, eps), t, c)
    return F.mse_loss(out[:, : x0.shape[1]].float(), eps)


# ----------------------------------------------------------------------------------------------------------------
# The generator objective with its hyper-parameters, and one GSIM iteration
# ----------------------------------------------------------------------------------------------------------------


class GeneratorLoss:
    """GSIM's generator objective (MARVAL arXiv:2511.15190 sec. 3 and supplementary A.10-A.11; docs/derivation.md
    section 4) with every hyper-parameter explicit, as EDM keeps its losses (Karras et al. 2022, arXiv:2206.00364,
    training/loss.py): called on the student's tokens it draws t and eps, noises the tokens and returns the loss; the
    training loop owns backward and the optimizers.

    diffusion: the head's 1000-step process. r: pseudo-Huber constant in SCORE units (MARVAL Table 1: 1e-5).
    path_weight: 1 is GSIM (the divergence's exact gradient), 0 SIM's loss. time_weight_power p: w(t) = sigma_t^p
    in score units (note 2). t_min, t_max: t ~ U{t_min..t_max} (note 2).
    """

    def __init__(self, diffusion, r=1e-5, path_weight=1.0, time_weight_power=1.0, t_min=20, t_max=980):
        self.diffusion, self.r, self.path_weight = diffusion, r, path_weight
        self.p, self.t_min, self.t_max = time_weight_power, t_min, t_max

    def sigma(self, t):
        return (1 - self.diffusion.table("alphas_cumprod", t.device)[t]).sqrt().float()  # (N,) sigma_t

    def __call__(self, x0, eps_teacher, eps_aux, generator=None):
        """x0 (N, C): student tokens with their graph to theta. eps_teacher(x_t, t), eps_aux(x_t, t) -> (N, C): the
        guided teacher's eps_p (MARVAL Eq. 10) and the aux's eps_phi, networks whose parameters are frozen here.
        Returns (loss, |y| per token in score units (N,), detached)."""
        t = mar.randint(self.t_min, self.t_max + 1, (len(x0),), generator, x0.device)
        eps = mar.randn(x0.shape, generator, x0.device)
        loss, eps_p, eps_phi = self.at(self.diffusion.q_sample(x0, t, eps), t, eps, eps_teacher, eps_aux)
        return loss, ((eps_p - eps_phi).norm(dim=-1) / self.sigma(t)).detach()

    def at(self, x_t, t, eps, eps_teacher, eps_aux):
        """The loss at x_t = alpha_t x0 + sigma_t eps (N, C), t (N,): (loss, eps_p, eps_phi). The teacher and aux run
        in fp32 whatever the autocast around: the pseudo-Huber gradient keeps only Delta / |Delta|, which bf16
        rounding of eps_p and eps_phi before the subtraction loses as the student converges (docs/derivation.md)."""
        sigma = self.sigma(t)                                                           # (N,)
        with torch.autocast(x_t.device.type, enabled=False):
            x_t = x_t.float()
            eps_p, eps_phi = eps_teacher(x_t, t), eps_aux(x_t, t)                       # (N, C) each, graphs to x_t
            weight = None if self.p == 1.0 else sigma ** (self.p - 1.0)  # eps-unit factor of w(t) = sigma_t^p
            loss = gsim_generator_loss(eps_p, eps_phi, eps, sigma, self.r, self.path_weight, weight)
        return loss, eps_p, eps_phi


def gsim_step(nets, latents, labels, gen, args, precision="fp32", rng=None):
    """One GSIM iteration (the loop of MARVAL's stage 1) on a batch of latents (B, C, H, W) and labels (B,):

      1. contexts: a random order and one mask ratio; the frozen transformer gives c and c_null per masked token,
      2. student tokens x0 = g_theta(z, c), z ~ N(0, I) read as x_400 (mar.one_step_x0),
      3. the generator loss (`GeneratorLoss`: x_t, guided teacher eps_p, aux eps_phi) and one optimizer step,
      4. `args.aux_steps` DSM updates of the aux network on the detached x0.
    The EMA of the student is the caller's (after the step). nets: `build_gsim`'s bundle; gen: the step's generator
    (orders, z, t, eps, on the device); rng: a `random.Random` for the mask ratio, drawn on the host so that no shape
    waits for the GPU (None: a fixed one). Returns 0-d tensors."""
    teacher, head, aux = nets.teacher, nets.head, nets.aux
    device, C = latents.device, teacher.token_embed_dim
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    # 1. contexts: random order, one mask ratio for the batch, conditions from the frozen teacher transformer
    gt = teacher.patchify(latents)                                                    # (B, L, C)
    orders = teacher.sample_orders(len(gt), gen, device)
    rng = rng or random.Random(0)
    ratio = args.mask_ratio  # None: MAR's truncated Gaussian, or with --uniform-mask-prob U(0, 1]
    if ratio is None:
        uniform = rng.random() < args.uniform_mask_prob
        ratio = 1.0 - rng.random() if uniform else mar.truncnorm_mask_ratio(teacher.mask_ratio_min, rng.random())
    n_masked = teacher.num_masked(ratio)                                              # host int, same in every row
    mask = teacher.random_masking(orders, n_masked)                                   # (B, L), 1 = to generate
    _, masked = mar.split_positions(mask, n_masked)                                   # (B, n_masked) positions

    def masked_conditions(model, cls):  # (N, Dz), N = B n_masked: image-major, ascending position
        return mar.gather_rows(model.conditions(gt, mask, cls, n_masked=n_masked), masked).flatten(0, 1).float()

    with torch.no_grad(), autocast:
        c = masked_conditions(teacher, teacher.class_emb(labels))
        c_null = masked_conditions(teacher, teacher.fake_latent.expand(len(gt), -1))
    if nets.student is not None:  # the student's own conditions (with grad); teacher and aux keep the teacher's c
        with autocast:
            c_student = masked_conditions(nets.student, nets.student.class_emb(labels))
    else:
        c_student = c
    m = teacher.diffusion_batch_mul  # several (z, t, eps) draws per token, as MAR's training does
    c, c_null, c_student = c.repeat(m, 1), c_null.repeat(m, 1), c_student.repeat(m, 1)   # (mN, Dz)
    # 2. one-step student tokens
    z = mar.randn((len(c), C), gen, device)
    with autocast:
        x0 = mar.one_step_x0(head, z, c_student, teacher.diffloss.train_diffusion).float()  # (mN, C), graph to theta
    # 3. generator loss: teacher and aux parameters frozen, their inputs NOT detached (gradients flow via x_t).
    # The target's CFG scale (note 1). "constant": --teacher-cfg for every context (the paper gives one scale).
    # "linear": MAR's sampler ramp (`mar.cfg_scale_at`) with the context's masked count as the count still masked,
    # so mostly-masked contexts (early AR steps) get little guidance and mostly-visible ones nearly --teacher-cfg. A
    # context does not say which AR step it stands for: this is the scale of the step that LEAVES that many masked,
    # one step behind the step that starts from it (K-free by design). Every row has the same count (random_masking).
    cfg = mar.cfg_scale_at(args.teacher_cfg, mask.shape[1], n_masked, args.teacher_cfg_schedule)
    eps_teacher = lambda x_t, t: mar.guided_eps(teacher.diffloss.net, x_t, t, c, c_null, cfg)[:, :C]  # eps_p
    eps_aux = lambda x_t, t: aux(x_t, t, c)[:, :C]                                                     # eps_phi
    aux.requires_grad_(False)
    loss_g, y = nets.loss(x0, eps_teacher, eps_aux, gen)
    trainable = list((nets.student or head).parameters())
    nets.opt_g.zero_grad(set_to_none=True)
    loss_g.backward()
    common.all_reduce_grads(trainable)
    gnorm = torch.nn.utils.clip_grad_norm_(trainable, args.grad_clip)
    nets.opt_g.step()
    aux.requires_grad_(True)
    # 4. auxiliary: DSM on the detached student tokens, fresh t and eps each step
    x0_d = x0.detach()
    for _ in range(args.aux_steps):
        with autocast:
            loss_a = aux_dsm_loss(aux, x0_d, c, teacher.diffloss.train_diffusion, gen)
        nets.opt_a.zero_grad(set_to_none=True)
        loss_a.backward()
        common.all_reduce_grads(list(aux.parameters()))
        torch.nn.utils.clip_grad_norm_(aux.parameters(), args.grad_clip)
        nets.opt_a.step()
    # 0-d tensors (the log reads them): no host copy inside the step
    return {"loss_g": loss_g.detach(), "loss_aux": loss_a.detach(), "y_mean": y.mean(), "y_max": y.max(),
            "grad_norm_g": gnorm, "mask_ratio": n_masked / mask.shape[1]}


def build_gsim(teacher, args):
    """What GSIM trains around ONE frozen teacher MAR, as a namespace: teacher, student (its own MAR with
    --train-transformer, else None), head (the one-step head g_theta being trained), ema (of the student MAR, or of
    the head alone), aux (the auxiliary head phi), opt_g and opt_a (their AdamW), loss (the `GeneratorLoss`).
    Head-only (default) keeps no copy of the transformer: the student is the teacher's transformer + the student
    head."""
    # Block checkpointing of all three heads: each keeps its activations for the backward through x_t otherwise
    # (MAR-H at 64 per GPU: docs/results.md, section 4). The frozen transformer runs without grad:
    # nothing to keep.
    teacher.diffloss.net.grad_checkpointing = args.grad_checkpointing
    if args.train_transformer:
        student = copy.deepcopy(teacher).requires_grad_(True)
        student.grad_checkpointing = args.grad_checkpointing
        head, ema = student.diffloss.net, copy.deepcopy(student)               # EMA of the whole student MAR
    else:
        student = None
        head = copy.deepcopy(teacher.diffloss.net).requires_grad_(True)
        ema = copy.deepcopy(head)                                               # EMA of the head alone
    ema.requires_grad_(False)
    aux = copy.deepcopy(teacher.diffloss.net).requires_grad_(True)
    opt_g = torch.optim.AdamW((student or head).parameters(), lr=args.lr_g, betas=tuple(args.betas), weight_decay=0.0)
    opt_a = torch.optim.AdamW(aux.parameters(), lr=args.lr_aux, betas=tuple(args.betas), weight_decay=0.0)
    loss = GeneratorLoss(teacher.diffloss.train_diffusion, args.r, args.path_weight, args.time_weight_power,
                         args.t_min, args.t_max)
    return SimpleNamespace(teacher=teacher, student=student, head=head, ema=ema, aux=aux, opt_g=opt_g, opt_a=opt_a,
                           loss=loss)


def with_head(mar_state, head_state):
    """A full MAR state dict: `mar_state` with its diffusion head replaced by `head_state` (a SimpleMLPAdaLN's)."""
    out = dict(mar_state)
    for k, v in head_state.items():
        out["diffloss.net." + k] = v
    return out


def head_of(mar_state):
    """The diffusion head's entries of a MAR state dict, prefix removed."""
    return {k[len("diffloss.net."):]: v for k, v in mar_state.items() if k.startswith("diffloss.net.")}


# ----------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------

# Toy: 30 epochs (630 steps) at lr 2e-4 for the student and the aux head, time weight sigma_t^3 (note 2): the
# settings that brought the student closest to its teacher on the digits (docs/results.md, section 8).
# The toy evaluations' fixed sample sets (evaluate.sample_toy draws batch i from seed + i): the student's progress
# during the run, and the final teacher-vs-student comparison, each the same images every time.
PROGRESS_SEED, FINAL_SEED = 10_000, 20_000
# What defines a GSIM run besides its --teacher: --resume refuses a checkpoint made with other values.
RESUME_KEYS = ("preset", "model", "img_size", "global_batch_size", "train_transformer", "teacher_cfg", "seed")
TOY_DEFAULTS = dict(out_dir="runs/toy_student", global_batch_size=64, lr_g=2e-4, lr_aux=2e-4, ema_rate=0.99,
                    grad_clip=1.0, epochs=30, time_weight_power=3.0, log_every=25, save_every=250, eval_every=250)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("setup")
    g.add_argument("--preset", choices=["toy"], default=None, help="the bundled toy digits (CPU-sized defaults)")
    g.add_argument("--model", choices=list(mar.PRESETS), default="mar_base", help="architecture of --teacher")
    g.add_argument("--teacher", required=True, help="MAR checkpoint (official or train_mar.py's); EMA weights used")
    g.add_argument("--out-dir", default=None, help="--preset toy: runs/toy_student")
    g.add_argument("--resume", action="store_true", help="continue from OUT_DIR/checkpoint-last.pth if present")
    g.add_argument("--overwrite", action="store_true", help="start over in an --out-dir that holds a checkpoint")
    g.add_argument("--max-steps", type=common.COUNT, default=None, help="stop after this many generator steps in all")
    g.add_argument("--seed", type=common.SEED, default=1)
    g.add_argument("--device", type=common.device_arg, default=None)
    common.add_run_flags(g)
    g = p.add_argument_group("data (as train_mar.py)")
    g.add_argument("--data-path", default=None)
    g.add_argument("--bad-images", choices=["skip", "check"], default="skip",
                   help="an unreadable image in --data-path: skip it (each one reported by path) or check every image "
                        "before training and stop, naming them")
    g.add_argument("--cached-path", default=None)
    g.add_argument("--vae", default=None)
    g.add_argument("--img-size", type=common.COUNT, default=256)
    g.add_argument("--global-batch-size", type=common.COUNT, default=512, help="paper: 64 per GPU x 8 GPUs")
    g.add_argument("--num-workers", type=common.COUNT0, default=8)
    g = p.add_argument_group("GSIM (paper defaults, MARVAL Table 1)")
    g.add_argument("--teacher-cfg", type=common.NONNEG, default=1.2,
                   help="MAR-convention CFG of the teacher (see note 1)")
    g.add_argument("--teacher-cfg-schedule", choices=["constant", "linear"], default="constant",
                   help="linear: the teacher's scale follows MAR's sampler ramp by the context's mask ratio (note 1)")
    g.add_argument("--r", type=common.POSITIVE, default=1e-5, help="pseudo-Huber constant, score units")
    g.add_argument("--path-weight", type=common.NONNEG, default=1.0, help="1: GSIM (exact gradient); 0: SIM's loss")
    g.add_argument("--t-min", type=common.number(int, 0, 999), default=20, help="generator loss t range (of 1000)")
    g.add_argument("--t-max", type=common.number(int, 0, 999), default=980)
    g.add_argument("--time-weight-power", type=common.NONNEG, default=1.0,
                   help="time weight w(t) = sigma_t^p of the score-space loss (1: eps units; toy: 3, note 2)")
    g.add_argument("--aux-steps", type=common.COUNT, default=2,
                   help="aux DSM updates per generator update (>= 1: the aux net must keep tracking the student)")
    g.add_argument("--uniform-mask-prob", type=common.FRACTION, default=0.5,
                   help="share of batches with a U(0,1] mask ratio")
    g.add_argument("--mask-ratio", type=common.number(float, 0, 1, low_open=True), default=None,
                   help="force one mask ratio (bench: 1.0, the worst case)")
    g.add_argument("--train-transformer", action="store_true", help="also train a student copy of the transformer")
    g.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute head blocks (teacher, student, aux) and student transformer blocks in backward")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=common.COUNT, default=30)
    g.add_argument("--lr-g", type=common.POSITIVE, default=5e-6, help="student lr")
    g.add_argument("--lr-aux", type=common.POSITIVE, default=5e-6, help="auxiliary lr")
    g.add_argument("--betas", type=common.BETA, nargs=2, default=(0.0, 0.999), help="AdamW betas of both (note 6)")
    g.add_argument("--grad-clip", type=common.POSITIVE, default=1.0)
    g.add_argument("--ema-rate", type=common.FRACTION, default=0.9999)
    g.add_argument("--precision", choices=["fp32", "bf16"], default=None, help="default: bf16 on GPU, fp32 on CPU")
    g = p.add_argument_group("logging and evaluation (toy)")
    g.add_argument("--log-every", type=common.COUNT, default=100)
    g.add_argument("--save-every", type=common.COUNT0, default=0,
                   help="also save every N generator steps (0: by --save-minutes only)")
    g.add_argument("--eval-every", type=common.COUNT0, default=0,
                   help="toy: score the student every N steps (0: at the end)")
    g.add_argument("--eval-images", type=common.COUNT0, default=400)
    g.add_argument("--eval-num-iter", type=common.COUNT, default=4)
    g.add_argument("--classifier", default="runs/toy_classifier.pt")
    args = p.parse_args(argv)
    if args.preset == "toy":
        p.set_defaults(**TOY_DEFAULTS)
        args = p.parse_args(argv)
    elif not (args.data_path or args.cached_path):
        p.error("give --preset toy, or --data-path (with --vae) or --cached-path")
    if args.data_path and not args.vae and args.preset != "toy":
        p.error("--data-path needs --vae (the local kl16.ckpt) to encode images")
    if args.mask_ratio is not None and not 0 < args.mask_ratio <= 1:
        p.error("--mask-ratio must be in (0, 1]")
    if not 0 <= args.t_min < args.t_max <= 999:
        p.error("need 0 <= --t-min < --t-max <= 999")
    if args.out_dir is None:
        p.error("--out-dir is required: the folder for checkpoint-last.pth and log.jsonl")
    if args.preset == "toy" and args.eval_images % 10:
        p.error(f"--eval-images {args.eval_images} is not a multiple of the 10 digit classes")
    return args


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------


def main(argv=None):
    args = get_args(argv)
    common.input_path("--teacher", args.teacher, "the teacher's MAR checkpoint (official or train_mar.py's)")
    data.check_source(args)
    rank, world, device, bsz = common.start_run(args, [("--teacher", args.teacher)],
                                                ("grid_teacher.png", "grid_student.png"))
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")

    # -- the teacher, read before anything else is done (the toy: its VAE and size are inside its checkpoint) ----------
    build = (lambda: data.toy_model_of(args.teacher)) if args.preset == "toy" else \
        (lambda: mar.PRESETS[args.model](img_size=args.img_size))
    with common.reading("--teacher", args.teacher):
        teacher = mar.load_mar(args.teacher, build(), use_ema=True, expect="teacher").to(device).eval()
        toy_tok = data.toy_tokenizer_of(args.teacher, device) if args.preset == "toy" else None
        teacher_config = data.toy_config_of(args.teacher) if args.preset == "toy" else None  # the toy size
    teacher.requires_grad_(False)
    if args.preset == "toy" and args.eval_images > 0 and os.path.exists(args.classifier):
        with common.reading("--classifier", args.classifier):  # read now, not after the run
            evaluate.load_toy_classifier(args.classifier)

    # -- data -------------------------------------------------------------------------------------------------------
    dataset, to_latents, steps_per_epoch = data.training_source(args, device, toy_tok)
    total_steps = args.epochs * steps_per_epoch

    # -- models: ONE frozen teacher MAR; the student head (and with --train-transformer the student's transformer),
    # its EMA, and the auxiliary head. Head-only keeps no copy of the transformer: the student is saved as the
    # teacher's transformer + the student head, a plain MAR checkpoint.
    nets = build_gsim(teacher, args)
    student, student_head, ema, aux, opt_g, opt_a = nets.student, nets.head, nets.ema, nets.aux, nets.opt_g, nets.opt_a
    n_trained = sum(p.numel() for p in (student or student_head).parameters())
    common.print0(f"student: {n_trained / 1e6:.2f}M trainable parameters "
               f"({'transformer + head' if student else 'head only'}); teacher cfg {args.teacher_cfg}; {precision}, "
               f"teacher/aux heads of the generator loss in fp32")
    teacher_sd = dict(teacher.state_dict()) if student is None else None

    def full_state(module):  # the MAR state dict of the student (or its EMA)
        return module.state_dict() if student is not None else with_head(teacher_sd, module.state_dict())

    def load_full(module, sd, what):
        mar.load_state_dict_strict(module, sd if student is not None else head_of(sd), what)

    step = 0
    ckpt_path = os.path.join(args.out_dir, "checkpoint-last.pth")
    record = common.run_record("distill_gsim.py", args, RESUME_KEYS,
                               {"--teacher": (args.teacher, common.fingerprint(teacher.state_dict()))})
    if args.resume and os.path.exists(ckpt_path):
        with common.reading("--resume", ckpt_path):
            ck = mar.read_checkpoint(ckpt_path)
            common.check_record(ck, record, ckpt_path)
            load_full(student or student_head, ck["model"], ckpt_path)
            load_full(ema, ck["model_ema"], ckpt_path + " [model_ema]")
            mar.load_state_dict_strict(aux, ck["aux"], ckpt_path + " [aux]")
            opt_g.load_state_dict(ck["optimizer"])
            opt_a.load_state_dict(ck["optimizer_aux"])
            step = ck["step"]
        common.print0(f"resumed from {ckpt_path} at step {step}")

    diverged = f"lower --lr-g (now {args.lr_g}) and --lr-aux (now {args.lr_aux})"

    def save():
        common.assert_finite(student or student_head, diverged)  # every rank: the same weights, the same verdict
        if common.is_main():
            extra = data.toy_entries(toy_tok, teacher_config) if toy_tok else {}  # passed on to RL and sampling
            common.save_checkpoint(ckpt_path, {"kind": "student", "record": record,
                                               "model": full_state(student or student_head),
                                               "model_ema": full_state(ema), "aux": aux.state_dict(),
                                               "optimizer": opt_g.state_dict(), "optimizer_aux": opt_a.state_dict(),
                                               "step": step, "args": vars(args), **extra})

    def ema_as_mar():  # the EMA student as a MAR (toy evaluation)
        if student is not None:
            return ema
        m = copy.deepcopy(teacher)
        m.diffloss.net.load_state_dict(ema.state_dict())
        return m

    # the toy's evaluator on every rank: each samples its share of the evaluation images, all score the gathered set
    evaluator = None
    if args.preset == "toy" and args.eval_images > 0:
        evaluator = evaluate.ToyEvaluator(args.classifier)

    # -- loop ------------------------------------------------------------------------------------------------------
    last = min(total_steps, args.max_steps) if args.max_steps is not None else total_steps
    common.check_run_length(last, world)
    log = common.RunLog(args.out_dir, last, step, "distill_gsim", diverged=diverged)
    control = common.StepControl(args.save_minutes)
    aux.train()
    workers = 0 if args.preset == "toy" else args.num_workers
    while step < last and not control.stopped:
        loader = data.epoch_loader(dataset, step, args.global_batch_size, world, rank, args.seed, workers,
                                   device)
        for xb, yb in loader:
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            gen = torch.Generator(device).manual_seed(common.step_seed(args.seed, rank, step, world))
            rng = random.Random(common.step_seed(args.seed, rank, step, world, stream=2))  # the mask ratio
            with torch.no_grad():
                latents = to_latents(xb, gen)
            stats = gsim_step(nets, latents, yb, gen, args, precision, rng)
            step += 1
            common.update_ema(ema, student or student_head, args.ema_rate)
            log.add(stats)
            save_now, stop = control.poll(step, last, args.save_every)
            if step % args.log_every == 0 or save_now:
                extra = {}
                if evaluator is not None and ((args.eval_every and step % args.eval_every == 0) or step == last):
                    extra = student_metrics(ema_as_mar(), toy_tok, evaluator, args)
                log.flush(step, total=last, **extra)  # raises on a non-finite loss, before the save
            if save_now:
                save()
                control.saved()
            if stop or step >= last:
                break
    log.close()
    control.close()
    if control.stopped:
        control.report(step)
        common.cleanup_distributed()
        return
    common.assert_ranks_agree(student or student_head)

    # -- toy: teacher (100 head steps, guided like the distillation target) vs one-step student, sampled by every
    # rank; the main process writes after the last collective
    if evaluator is not None:
        report = compare_on_toy(teacher, ema_as_mar(), toy_tok, evaluator, args)
    common.cleanup_distributed()
    if evaluator is not None and common.is_main():
        for who, (imgs, labels) in report.pop("images").items():
            figures.save_class_grid(imgs, labels, os.path.join(args.out_dir, f"grid_{who}.png"))
        with open(os.path.join(args.out_dir, "eval.json"), "w") as f:
            json.dump(report, f, indent=2)
        for who in ("teacher", "student"):
            print(f"{who:8s} " + ", ".join(f"{k} {v:.4g}" for k, v in report[who].items()))
        print(f"speedup {report['speedup']:.1f}x; real-split FID floor {report['real_split_fid']:.3f}")


def student_metrics(student, tokenizer, evaluator, args):
    imgs, labels, _ = evaluate.sample_toy(student, tokenizer, args.eval_images, args.eval_num_iter, one_step=True,
                                          seed=PROGRESS_SEED)
    m = evaluator(imgs, labels)
    return {"student_toy_fid": m["toy_fid"], "student_accuracy": m["accuracy"]}


def compare_on_toy(teacher, student, tokenizer, evaluator, args):
    """Same labels, K and image count; the teacher at its distillation CFG with 100 head steps, the student one
    step at cfg 1; both decoded by the toy VAE. Every rank calls it (`evaluate.sample_toy`); the report's "images"
    entry holds each model's (images, labels) for the grids."""
    out = {}
    for who, model, kw in (("teacher", teacher, dict(cfg=args.teacher_cfg)),
                           ("student", student, dict(one_step=True))):
        evaluate.sample_toy(model, tokenizer, 20, args.eval_num_iter, **kw)  # warm-up: first-call costs untimed
        imgs, labels, sec = evaluate.sample_toy(model, tokenizer, args.eval_images, args.eval_num_iter, seed=FINAL_SEED,
                                                **kw)
        out.setdefault("images", {})[who] = (imgs, labels)
        out[who] = dict(evaluator(imgs, labels), sec_per_image=sec)
    out["speedup"] = out["teacher"]["sec_per_image"] / out["student"]["sec_per_image"]
    out["real_split_fid"] = evaluator.real_split_fid()
    out["num_images"], out["num_iter"], out["teacher_cfg"] = args.eval_images, args.eval_num_iter, args.teacher_cfg
    return out


if __name__ == "__main__":
    common.cli(main)
