"""MAR (Li et al. 2024, arXiv:2406.11838) and the MARVAL one-step sampler (Gu et al. 2025, arXiv:2511.15190).

The math file of the project, with gaussian_diffusion.py (the IDDPM process the head runs on). Every stage imports
it. Read it top to bottom:

  1. the transformer block (timm's pre-norm ViT block, written out),
  2. the per-token diffusion head `SimpleMLPAdaLN` and `DiffLoss` (MAR sec. 3.2, Eq. 1: the per-token diffusion
     loss), with `guided_eps` (CFG on eps; MARVAL Eq. 10) and `one_step_x0` (MARVAL's one-step generator),
  3. the masking and sampling schedules (MAR sec. 4.2 and appendix B) and the random-draw helpers,
  4. `MAR`: masked encoder/decoder (the official state-dict layout), its training loss and `sample_tokens`: K AR
     iterations, each token drawn by `HeadSampler` (MAR: N reverse diffusion steps, CFG; MARVAL: one call at t* = 400),
  5. presets (the released B / L / H and a tiny one) and checkpoint loading (strict, EMA weights by default).

The run machinery is in common.py; README's equation index maps every equation of the papers to its function. Nothing
here calls `.cuda()`: the device comes from the inputs. Randomness rule (every file): a draw takes its GENERATOR's
device, then moves to where it is used (`randn`, `rand`, `randint`): torch refuses a CPU draw from a CUDA generator.
Quick use: README, "The paper's scale" (under torch.no_grad(); a student: head=HeadSampler(one_step=True), cfg 1).
"""
import argparse
import functools
import math
import os
import pickle
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from gaussian_diffusion import GaussianDiffusion

# MAR's KL-16 latents are multiplied by this before the transformer ("normalize the std of latent to be 1").
VAE_SCALE = 0.2325
# MARVAL's one-step generator reads its input noise as x_t at this fixed step of the 1000-step schedule.
ONE_STEP_T = 400


# ==== Transformer block (timm 0.9 `Block`, written out: pre-norm ViT block, exact GELU, qkv rows ordered q|k|v) ===

class Attention(nn.Module):
    def __init__(self, dim, num_heads, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.num_heads, self.attn_drop = num_heads, attn_drop
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        B, N, D = x.shape
        # (B, N, 3D) -> (3, B, heads, N, head_dim): the 3D output rows are [q | k | v], each split into heads.
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, D)))  # (B, N, D)


class Mlp(nn.Module):
    def __init__(self, dim, hidden, drop=0.0):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)  # used twice, like timm's drop1/drop2

    def forward(self, x):
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


class Block(nn.Module):
    """x + attn(norm1(x)), then x + mlp(norm2(x)). LayerNorm eps 1e-6 as in the official named configs."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, proj_drop=0.0, attn_drop=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, attn_drop, proj_drop)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), proj_drop)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


# ----------------------------------------------------------------------------------------------------------------
# Diffusion head: SimpleMLPAdaLN (MAR models/diffloss.py). Input x_t (N, C), timestep t (N,), condition c (N, Dz).
# Output (N, 2C): first C channels predict eps, last C the learned-range variance interpolation v in [-1, 1].
# ----------------------------------------------------------------------------------------------------------------

class TimestepEmbedder(nn.Module):
    def __init__(self, width, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t):
        # Sinusoidal embedding of the ORIGINAL integer step 0..999, cos first then sin (MAR/DiT convention).
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        phase = t[:, None].float() * freqs[None]  # (N, half)
        return self.mlp(torch.cat([torch.cos(phase), torch.sin(phase)], dim=-1))  # (N, W)


class ResBlock(nn.Module):
    """adaLN residual MLP block: h = mlp(LN(x) * (1 + scale) + shift); x + gate * h (no width expansion)."""

    def __init__(self, width):
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x, y):
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)  # (N, W) each
        return x + gate * self.mlp(self.in_ln(x) * (1 + scale) + shift)


class FinalLayer(nn.Module):
    def __init__(self, width, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x, y):
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)  # (N, W) each
        return self.linear(self.norm_final(x) * (1 + scale) + shift)


class SimpleMLPAdaLN(nn.Module):
    def __init__(self, in_channels, model_channels, out_channels, z_channels, num_res_blocks, grad_checkpointing=False):
        super().__init__()
        self.in_channels, self.grad_checkpointing = in_channels, grad_checkpointing
        self.time_embed = TimestepEmbedder(model_channels)
        self.cond_embed = nn.Linear(z_channels, model_channels)
        self.input_proj = nn.Linear(in_channels, model_channels)
        self.res_blocks = nn.ModuleList([ResBlock(model_channels) for _ in range(num_res_blocks)])
        self.final_layer = FinalLayer(model_channels, out_channels)
        # Official init: xavier Linear, N(0, .02) time MLP, zero adaLN outputs and zero final linear (output 0).
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        for blk in self.res_blocks:
            nn.init.zeros_(blk.adaLN_modulation[-1].weight)
            nn.init.zeros_(blk.adaLN_modulation[-1].bias)
        for p in [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]:
            nn.init.zeros_(p.weight)
            nn.init.zeros_(p.bias)

    def forward(self, x, t, c):
        x = self.input_proj(x)                       # (N, W)
        y = self.time_embed(t) + self.cond_embed(c)  # (N, W): time and per-token condition share one vector
        for blk in self.res_blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, y, use_reentrant=False)
            else:
                x = blk(x, y)
        return self.final_layer(x, y)                # (N, 2C)

    def forward_with_cfg(self, x, t, c, cfg_scale):
        """Official CFG call: rows [:N/2] conditional, [N/2:] unconditional; only the FIRST half of x is used.

        eps = uncond + cfg * (cond - uncond) is written into both halves; the variance channels stay per half.
        """
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half]), t, c)
        eps, rest = out[:, : self.in_channels], out[:, self.in_channels:]
        cond, uncond = eps.chunk(2)  # (N/2, C) each
        guided = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([guided, guided]), rest], dim=1)


class DiffLoss(nn.Module):
    """MAR's Diffusion Loss (MAR arXiv:2406.11838 sec. 3.2, Eq. 1): a small denoiser eps_theta(x_t | t, c) models
    each token's distribution p(x | c) given the transformer's condition c (MAR's paper calls it z; here z is
    MARVAL's noise input of the one-step generator), trained by

        L(c, x) = E_{eps, t} |eps - eps_theta(x_t | t, c)|^2     (+ IDDPM's variance term, gaussian_diffusion.py)

    `net` plus the training (1000-step) and sampling (respaced) diffusions."""

    def __init__(self, target_channels, z_channels, depth, width, num_sampling_steps="100", grad_checkpointing=False):
        super().__init__()
        self.in_channels = target_channels
        self.net = SimpleMLPAdaLN(target_channels, width, target_channels * 2, z_channels, depth, grad_checkpointing)
        self.train_diffusion = GaussianDiffusion(1000)
        self.num_sampling_steps = str(num_sampling_steps)
        self._gen = {}  # respaced diffusions, built on first use, keyed by the step count

    def gen_diffusion(self, num_steps=None):
        key = str(num_steps or self.num_sampling_steps)
        if key not in self._gen:
            self._gen[key] = GaussianDiffusion(1000, key)
        return self._gen[key]

    def forward(self, target, c, rows=None, generator=None):
        """Training loss: target tokens (N, C), the transformer's conditions c (N, Dz), `rows` (n,) the indices of the
        rows whose loss counts (None: all). t ~ U{0..999} and the noise are drawn for all N rows, then indexed.

        MAR runs the head on every row and multiplies the loss by the 0/1 mask; rows of weight 0 add nothing to the
        loss or its gradient, so only the counted rows are run: the same draws and the same loss, bit for bit, with
        less head work (MAR's mean mask ratio is ~0.87). `rows` has a size known on the host (MAR.forward builds it
        from the masked count), so no shape here depends on data."""
        t = randint(0, 1000, (len(target),), generator, target.device)
        noise = randn(target.shape, generator, target.device)
        if rows is None:
            return self.train_diffusion.training_losses(self.net, target, t, c, noise)["loss"].mean()
        pick = lambda x: x.index_select(0, rows)  # (n, ...) the counted rows, in the order of `rows`
        loss = self.train_diffusion.training_losses(self.net, pick(target), pick(t), pick(c), pick(noise))["loss"]
        return loss.sum() / len(rows)  # = MAR's (loss * mask).sum() / mask.sum() for a 0/1 mask

    def sample(self, c, x_T, step_noise, c_null=None, cfg=1.0, temperature=1.0, num_steps=None, clip_denoised=False):
        """MAR teacher: reverse diffusion of N tokens from x_T (N, C) over the respaced steps, CFG on eps.

        Each step is MAR sec. 3.2's sampler x_{t-1} = mean(x_t, eps_theta) + sigma_t tau delta (MAR Eq. 2 with its
        temperature tau; `GaussianDiffusion.p_sample`).

        step_noise: (S, N, C) noise for the S reverse steps (drawn by the caller, so a generator decides it).
        """
        diff = self.gen_diffusion(num_steps)
        x = x_T
        for k in reversed(range(diff.num_timesteps)):
            t = torch.full((len(x),), k, dtype=torch.long, device=x.device)
            out = guided_eps(self.net, x, diff.original_t(t), c, c_null, cfg)
            x = diff.p_sample(out, x, t, step_noise[k], temperature, clip_denoised)
        return x


def guided_eps(net, x, t, c, c_null=None, cfg=1.0):
    """Head output (N, 2C) with CFG on eps only: eps_hat = eps_u + cfg * (eps_c - eps_u); variance from the cond branch.

    MAR's convention (MAR arXiv:2406.11838 appendix B). In score form s = -eps_hat / sigma this is MARVAL Eq. 10,
    s_p = (1 + w) s(x_t | c) - w s(x_t | null) with w = cfg - 1 (docs/derivation.md section 3: the two readings).
    x (N, C), t (N,) ORIGINAL steps, c / c_null (N, Dz). Equivalent to `net.forward_with_cfg` on the doubled batch
    but keeps one trajectory of N rows (the official second half is computed and thrown away).
    """
    if c_null is None or cfg == 1.0:
        return net(x, t, c)
    out = net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([c, c_null]))  # (2N, 2C): [cond; uncond]
    cond, uncond = out.chunk(2)  # (N, 2C) each
    C = x.shape[-1]
    return torch.cat([uncond[:, :C] + cfg * (cond[:, :C] - uncond[:, :C]), cond[:, C:]], dim=-1)


def one_step_x0(net, z, c, diffusion, c_null=None, cfg=1.0):
    """MARVAL one-step generator g_theta(z, c): read z ~ N(0, I) (N, C) as x_400 and return the head's x0 prediction

        x0 = (z - sqrt(1 - abar_400) * eps_hat(z, 400, c)) / sqrt(abar_400) = 1.244193 z - 0.740281 eps_hat.

    (MARVAL arXiv:2511.15190 sec. 3: "the one-step generator predicts the noise from the fixed step 400".)
    `diffusion` is the 1000-step process. Differentiable in the head's weights and in z and c. cfg = 1 is the
    distilled student's default.
    """
    t = torch.full((len(z),), ONE_STEP_T, dtype=torch.long, device=z.device)
    eps = guided_eps(net, z, t, c, c_null, cfg)[:, : z.shape[-1]]  # (N, C)
    return diffusion.predict_x0(z, t, eps)


@dataclass(frozen=True)
class HeadSampler:
    """How an AR step draws its new tokens from their conditions (`MAR.sample_tokens`' `head`). MAR: the head's
    reverse diffusion over `steps` respaced steps (None: the model's "100"), temperature = MAR's tau. MARVAL
    (one_step=True): `one_step_x0`, one head call from t* = 400 on z ~ N(0, tau^2 I) (tau != 1 is not in MARVAL,
    whose sampler is tau = 1). `clip` bounds the reverse diffusion's predicted x0 (`gaussian_diffusion.clip_x0`;
    False as in MAR, the latents' range for the toy teacher); the one-step x0 is never clipped (at t* = 400 an eps
    error reaches x0 scaled by 0.74 only)."""
    one_step: bool = False
    steps: int | None = None
    temperature: float = 1.0
    clip: float | bool = False

    def noise(self, diffloss, bsz, k, generator, device):
        """The noise one AR step needs for k tokens per image: (B k, C) for one step; (S+1, B k, C) for S reverse
        steps, [0] = x_T and [1:] one per step. Each image's draws come from its own generator."""
        C = diffloss.in_channels
        if self.one_step:  # (B, k C) -> (B k, C): image-major, as the step's conditions
            return _randn((bsz, k * C), generator, device).reshape(bsz * k, C) * self.temperature
        S = diffloss.gen_diffusion(self.steps).num_timesteps
        noise = _randn((bsz, (S + 1) * k * C), generator, device).reshape(bsz, S + 1, k, C)  # per image: x_T, steps
        return noise.permute(1, 0, 2, 3).reshape(S + 1, bsz * k, C)  # (S+1, B k, C)

    def __call__(self, diffloss, c, c_null, cfg, noise):
        """Tokens (B k, C) for conditions c (B k, Dz) (c_null: the unconditional ones, for cfg != 1)."""
        if self.one_step:
            return one_step_x0(diffloss.net, noise, c, diffloss.train_diffusion, c_null, cfg)
        return diffloss.sample(c, noise[0], noise[1:], c_null, cfg, self.temperature, self.steps, self.clip)


# ==== Masking helpers ===========================================================================================

def truncnorm_mask_ratio(mask_ratio_min, u):
    """The masking ratio of quantile u in [0, 1) of N(1, 0.25^2) truncated to [mask_ratio_min, 1] (MAR sec. 4.2; the
    official code's scipy.stats.truncnorm(a=(min-1)/0.25, b=0, loc=1, scale=0.25)), by inverse CDF:
    r = 1 + 0.25 Phi^-1(Phi(a) + u (Phi(0) - Phi(a))), a = (min - 1) / 0.25. On the host: no GPU round trip."""
    lo = NormalDist().cdf((mask_ratio_min - 1) / 0.25)  # Phi(a); Phi(b = 0) = 0.5
    return 1.0 + 0.25 * NormalDist().inv_cdf(lo + u * (0.5 - lo))


def mask_schedule(seq_len, num_iter):
    """MAR's sampler schedule (MAR sec. 4.2, the cosine schedule of MaskGIT, Chang et al. 2022, arXiv:2202.04200):
    for each AR step, (tokens predicted, tokens still masked after).

    After step k, floor(L cos(pi/2 (k+1)/K)) stay masked, clamped to [1, still masked - 1]: a step predicts at least
    one token while two or more remain, none while one remains (K > L), and the last step all the rest. The count is
    the one the linear CFG schedule uses, and it is 1 (not 0) at the last step: the official quirk `cfg_schedule`
    reproduces.
    """
    if num_iter < 1:
        raise ValueError(f"num_iter must be at least 1, got {num_iter}")
    masked, out = seq_len, []
    for step in range(num_iter):
        mask_len = math.floor(seq_len * np.cos(math.pi / 2.0 * (step + 1) / num_iter))
        mask_len = max(1, min(masked - 1, mask_len))
        n_pred = masked if step == num_iter - 1 else masked - mask_len
        out.append((n_pred, mask_len))
        masked -= n_pred
    return out


def cfg_scale_at(cfg, seq_len, mask_len, schedule="linear"):
    """CFG scale of one AR step (MAR appendix B: the scale grows linearly with the tokens generated, after Muse,
    Chang et al. 2023): "linear" cfg_k = 1 + (cfg - 1) (L - still_masked_k) / L, in fp32 like the original."""
    if schedule == "linear":
        f = np.float32  # host arithmetic in fp32, the original's tensor dtype: the same scale to the bit
        return float(f(1) + f(cfg - 1) * (f(seq_len) - f(mask_len)) / f(seq_len))
    if schedule == "constant":
        return float(cfg)
    raise NotImplementedError(f"cfg_schedule must be 'linear' or 'constant', got {schedule!r}")


def split_positions(mask, n_masked=None):
    """Visible and masked positions of a (B, L) mask (1 = masked), each ascending: (B, L - n_masked), (B, n_masked).
    Every row masks `n_masked` tokens, a count its maker knows on the host (without it: read off the mask, a
    device-to-host copy). Ascending as boolean indexing gives them, so gathers match MAR's x[mask.bool()] exactly."""
    L = mask.shape[1]
    if n_masked is None:
        n_masked = int(mask[0].sum())
    order = torch.sort(mask, dim=1, stable=True).indices  # (B, L): visible positions, then masked ones
    return order[:, : L - n_masked], order[:, L - n_masked:]


def gather_rows(x, index):
    """x (B, N, D) gathered along N at index (B, n) -> (B, n, D)."""
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


def _gen_device(generator, device):  # the randomness rule: draw where the generator lives (or on `device`)
    return generator.device if generator is not None else (device or "cpu")


def randn(shape, generator=None, device=None):
    """N(0, 1) noise of `shape` drawn on the generator's device, returned on `device`."""
    return torch.randn(shape, generator=generator, device=_gen_device(generator, device)).to(device)


def rand(shape, generator=None, device=None, dtype=None):
    """U[0, 1) of `shape` drawn on the generator's device, returned on `device`."""
    return torch.rand(shape, generator=generator, device=_gen_device(generator, device), dtype=dtype).to(device)


def randint(low, high, shape, generator=None, device=None):
    """Integers in [low, high) of `shape` drawn on the generator's device, returned on `device`."""
    return torch.randint(low, high, shape, generator=generator, device=_gen_device(generator, device)).to(device)


def _randn(shape, gens, device):
    """Gaussian noise of shape (B, ...): from one generator, or one generator per image (row b from gens[b])."""
    if isinstance(gens, (list, tuple)):
        return torch.stack([randn(shape[1:], g, device) for g in gens])
    return randn(shape, gens, device)


def _randperm(bsz, n, gens, device):
    """(B, n) random orders: one permutation per image."""
    if isinstance(gens, (list, tuple)) and len(gens) != bsz:
        raise ValueError(f"{len(gens)} generators for a batch of {bsz}: give one per image")
    gens = gens if isinstance(gens, (list, tuple)) else [gens] * bsz  # a shared generator is drawn from B times
    return torch.stack([torch.randperm(n, generator=g, device=_gen_device(g, None)) for g in gens]).to(device)


# ==== MAR =======================================================================================================

class MAR(nn.Module):
    """Masked autoregressive model with a per-token diffusion head. Constructor keywords are the official ones."""

    def __init__(self, img_size=256, vae_stride=16, patch_size=1, encoder_embed_dim=1024, encoder_depth=16,
                 encoder_num_heads=16, decoder_embed_dim=1024, decoder_depth=16, decoder_num_heads=16, mlp_ratio=4.0,
                 vae_embed_dim=16, mask_ratio_min=0.7, label_drop_prob=0.1, class_num=1000, attn_dropout=0.1,
                 proj_dropout=0.1, buffer_size=64, diffloss_d=3, diffloss_w=1024, num_sampling_steps="100",
                 diffusion_batch_mul=4, grad_checkpointing=False):
        super().__init__()
        self.config = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        self.vae_embed_dim, self.patch_size = vae_embed_dim, patch_size
        self.seq_h = self.seq_w = img_size // vae_stride // patch_size
        self.seq_len = self.seq_h * self.seq_w
        self.token_embed_dim = vae_embed_dim * patch_size ** 2
        self.buffer_size, self.mask_ratio_min = buffer_size, mask_ratio_min
        self.label_drop_prob, self.class_num = label_drop_prob, class_num
        self.diffusion_batch_mul, self.grad_checkpointing = diffusion_batch_mul, grad_checkpointing
        De, Dd, L = encoder_embed_dim, decoder_embed_dim, self.seq_len

        # Registration order = official state_dict order.
        self.class_emb = nn.Embedding(class_num, De)
        self.fake_latent = nn.Parameter(torch.zeros(1, De))  # the "null class": label dropout and CFG's uncond branch
        self.z_proj = nn.Linear(self.token_embed_dim, De)
        self.z_proj_ln = nn.LayerNorm(De, eps=1e-6)
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, L + buffer_size, De))
        self.encoder_blocks = nn.ModuleList([Block(De, encoder_num_heads, mlp_ratio, proj_dropout, attn_dropout)
                                             for _ in range(encoder_depth)])
        self.encoder_norm = nn.LayerNorm(De, eps=1e-6)
        self.decoder_embed = nn.Linear(De, Dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, Dd))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, L + buffer_size, Dd))
        self.decoder_blocks = nn.ModuleList([Block(Dd, decoder_num_heads, mlp_ratio, proj_dropout, attn_dropout)
                                             for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(Dd, eps=1e-6)
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, L, Dd))
        self._init_weights()  # before the head is built, as in the official code (the head inits itself)
        self.diffloss = DiffLoss(self.token_embed_dim, Dd, diffloss_d, diffloss_w, num_sampling_steps,
                                 grad_checkpointing)

    def _init_weights(self):
        for p in [self.class_emb.weight, self.fake_latent, self.mask_token, self.encoder_pos_embed_learned,
                  self.decoder_pos_embed_learned, self.diffusion_pos_embed_learned]:
            nn.init.normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # -- tokens <-> latent images ------------------------------------------------------------------------------
    def patchify(self, x):
        """(B, C, H, W) -> (B, h*w, C*p*p), tokens row-major, each token laid out (c, p, p)."""
        B, C, H, W = x.shape
        p = self.patch_size
        x = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)  # (B, h, w, C, p, p)
        return x.reshape(B, (H // p) * (W // p), C * p * p)  # (B, L, C p p)

    def unpatchify(self, x):
        """(B, h*w, C*p*p) -> (B, C, h*p, w*p), the exact inverse of `patchify`."""
        B, p, C = x.shape[0], self.patch_size, self.vae_embed_dim
        x = x.reshape(B, self.seq_h, self.seq_w, C, p, p).permute(0, 3, 1, 4, 2, 5)  # (B, C, h, p, w, p)
        return x.reshape(B, C, self.seq_h * p, self.seq_w * p)  # (B, C, H, W)

    # -- masks ------------------------------------------------------------------------------------------------------
    def sample_orders(self, bsz, generator=None, device=None):
        """(B, L) random generation orders, one permutation per image."""
        return _randperm(bsz, self.seq_len, generator, device or self.fake_latent.device)

    def num_masked(self, mask_ratio=None, generator=None):
        """Tokens to mask in every row of a training batch: ceil(L * ratio), one ratio per batch (a host integer:
        every shape that follows is known before the GPU runs). Without a ratio, MAR's truncated Gaussian from u
        drawn on `generator`'s device and read back, a host synchronisation: the training loops pass a host draw."""
        if mask_ratio is None:
            u = rand((), generator, dtype=torch.float64).item()
            mask_ratio = truncnorm_mask_ratio(self.mask_ratio_min, u)
        return int(np.ceil(self.seq_len * mask_ratio))

    def random_masking(self, orders, n_masked):
        """(B, L) float mask, 1 = masked (to predict): the first `n_masked` positions of each order. Every row masks
        the same count, which the sparse encoder's (B, buffer + L - n_masked) sequence needs."""
        mask = torch.zeros(orders.shape, device=orders.device)
        return mask.scatter(1, orders[:, :n_masked], 1.0)

    # -- transformer ------------------------------------------------------------------------------------------------
    def _run(self, blocks, x):
        for blk in blocks:
            x = checkpoint(blk, x, use_reentrant=False) if self.grad_checkpointing and torch.is_grad_enabled() \
                else blk(x)
        return x

    def _keep_index(self, mask, n_masked=None):
        """(B, buffer + n_visible) positions the encoder keeps: every buffer slot, then the visible tokens in
        ascending order (the order MAR's boolean indexing gives, so results match it bit for bit)."""
        visible, _ = split_positions(mask, n_masked)  # (B, n_visible)
        buf = torch.arange(self.buffer_size, device=mask.device).expand(len(mask), -1)  # (B, buffer)
        return torch.cat([buf, visible + self.buffer_size], dim=1)

    def forward_mae_encoder(self, x, mask, class_embedding, generator=None, n_masked=None):
        """x (B, L, C) tokens, mask (B, L) 1 = masked, class_embedding (B, De) -> (B, buffer + n_visible, De).

        All `buffer_size` leading slots hold the class embedding (or fake_latent under label dropout in training);
        masked tokens are dropped before the encoder (MAE-style), so every row must have the same mask count,
        `n_masked` (read off the mask when not given; the sampler and the training steps give it, so that no shape
        depends on data and the step needs no device-to-host copy).
        """
        B, L, _ = x.shape
        x = self.z_proj(x)  # (B, L, De)
        buf = class_embedding[:, None].expand(B, self.buffer_size, -1)
        if self.training and self.label_drop_prob > 0:
            drop = (rand(B, generator, x.device) < self.label_drop_prob).to(x.dtype)[:, None, None]  # (B, 1, 1)
            buf = drop * self.fake_latent[None] + (1 - drop) * buf
        x = torch.cat([buf.to(x.dtype), x], dim=1)  # (B, buffer + L, De)
        x = self.z_proj_ln(x + self.encoder_pos_embed_learned)
        x = gather_rows(x, self._keep_index(mask, n_masked))  # (B, buffer + n_visible, De)
        return self.encoder_norm(self._run(self.encoder_blocks, x))

    def forward_mae_decoder(self, x, mask):
        """Encoder output (B, buffer + n_visible, De) -> per-token conditions c (B, L, Dd) for the head."""
        x = self.decoder_embed(x)  # (B, buffer + n_visible, Dd)
        B, n_keep, Dd = x.shape
        keep = self._keep_index(mask, self.buffer_size + self.seq_len - n_keep)  # the count read off x's shape
        # The kept rows go back to their positions in a full sequence of mask tokens (an out-of-place scatter:
        # gradients reach both the kept rows and mask_token).
        full = self.mask_token.to(x.dtype).expand(B, self.buffer_size + self.seq_len, Dd)
        full = full.scatter(1, keep[..., None].expand(-1, -1, Dd), x)  # (B, buffer + L, Dd)
        x = self.decoder_norm(self._run(self.decoder_blocks, full + self.decoder_pos_embed_learned))
        return x[:, self.buffer_size:] + self.diffusion_pos_embed_learned  # (B, L, Dd)

    def conditions(self, tokens, mask, class_embedding, generator=None, n_masked=None):
        """Encoder + decoder: per-token head conditions c (B, L, Dd). n_masked: see `forward_mae_encoder`."""
        return self.forward_mae_decoder(self.forward_mae_encoder(tokens, mask, class_embedding, generator, n_masked),
                                        mask)

    # -- training ---------------------------------------------------------------------------------------------------
    def forward(self, imgs, labels, generator=None, mask_ratio=None):
        """MAR training loss. imgs: latents (B, C, H, W) already multiplied by 0.2325; labels (B,). mask_ratio: one
        ratio for the batch (None: MAR's truncated Gaussian draw)."""
        gt = self.patchify(imgs)  # (B, L, C)
        B, L, _ = gt.shape
        orders = self.sample_orders(B, generator, gt.device)
        n_masked = self.num_masked(mask_ratio, generator)
        mask = self.random_masking(orders, n_masked)
        c = self.conditions(gt, mask, self.class_emb(labels), generator, n_masked)  # (B, L, Dd)
        # diffusion_batch_mul copies of every token (tiled, not interleaved), each with its own t and noise.
        m = self.diffusion_batch_mul
        target = gt.reshape(-1, gt.shape[-1]).repeat(m, 1)  # (m B L, C)
        c = c.reshape(-1, c.shape[-1]).repeat(m, 1)         # (m B L, Dd)
        # The loss counts the masked tokens only: their row indices in the (m, B, L) tiling, copy-major, then
        # image, then ascending position (the order of MAR's flattened mask).
        _, masked = split_positions(mask, n_masked)                                      # (B, n_masked)
        offsets = torch.arange(m * B, device=gt.device).reshape(m, B, 1) * L              # (m, B, 1)
        rows = (offsets + masked[None]).reshape(-1)                                       # (m B n_masked,)
        return self.diffloss(target, c, rows, generator)

    # -- sampling ---------------------------------------------------------------------------------------------------
    def sample_tokens(self, bsz, num_iter=64, cfg=1.0, cfg_schedule="linear", labels=None, head=HeadSampler(),
                      generator=None, run_step=None):
        """MAR's outer masked-AR loop (MAR sec. 4.2); returns latents (B, C, H, W) in the 0.2325-scaled space.

        K = num_iter steps, each revealing the tokens `mask_schedule` frees (random order per image) and drawing them
        with `head`: MAR's reverse diffusion by default, MARVAL's one-step generator with HeadSampler(one_step=True).
        CFG (cfg, cfg_schedule: MAR appendix B) acts on eps; a distilled student samples at cfg = 1.

        generator: a torch.Generator, or a list of B generators (one per image: an image then depends only on its
        own generator, not on its batch). Sample under torch.no_grad(): with grad mode on, the latents keep every
        AR step's graph. run_step(step, ar_step, tokens, mask, n_masked, pos, noise) runs each AR step and returns the
        new tokens (B, L, C) (default: ar_step(tokens, mask, ...), ar_step = partial(self._ar_step, labels=, head=,
        cfg=)); RL adds checkpointing, truncation and its frozen reference there (rl_refine.RLSteps). The noise is
        drawn before the step runs, so a recomputed step is exact.

        Every shape is known on the host (the schedule fixes each step's count, and the still-masked set is a prefix
        of `orders`): index tensors of those sizes, no device-to-host copy, an AR step CUDA graphs can capture.
        """
        run_step = run_step or (lambda step, ar_step, *inputs: ar_step(*inputs))
        device = self.fake_latent.device
        if labels is not None and len(labels) != bsz:
            raise ValueError(f"labels has {len(labels)} entries for a batch of {bsz}")
        orders = self.sample_orders(bsz, generator, device)
        tokens = torch.zeros(bsz, self.seq_len, self.token_embed_dim, device=device)
        mask = torch.ones(bsz, self.seq_len, device=device)
        n_masked = self.seq_len  # the same count in every row: the schedule is deterministic
        for step, (n_pred, mask_len) in enumerate(mask_schedule(self.seq_len, num_iter)):
            if n_pred == 0:  # num_iter > L can leave a step with nothing to predict
                continue
            # The tokens leaving the mask set this step: the last n_pred of the still-masked prefix of `orders`,
            # in ascending position (the order MAR's boolean indexing visits them in, which pairs them with noise).
            pos = orders[:, n_masked - n_pred: n_masked].sort(dim=1).values  # (B, k)
            noise = head.noise(self.diffloss, bsz, n_pred, generator, device)
            cfg_k = cfg_scale_at(cfg, self.seq_len, mask_len, cfg_schedule) if cfg != 1.0 else 1.0
            ar_step = functools.partial(self._ar_step, labels=labels, head=head, cfg=cfg_k)
            tokens = run_step(step, ar_step, tokens, mask, n_masked, pos, noise)
            n_masked -= n_pred
            mask = torch.zeros_like(mask).scatter(1, orders[:, :n_masked], 1.0)  # (B, L) the still-masked prefix
        return self.unpatchify(tokens)

    def _ar_step(self, tokens, mask, n_masked, pos, noise, labels, head, cfg):
        """One AR iteration: conditions for all positions from the current tokens and mask (n_masked per row), then
        `head` draws the tokens at positions `pos` (B, k) from `noise`; returns the tokens with those k written.
        With cfg != 1 the transformer also runs on an unconditional copy of the batch (fake_latent) for CFG."""
        B, k = pos.shape
        cls = self.class_emb(labels) if labels is not None else self.fake_latent.expand(B, -1)
        if cfg != 1.0:  # CFG: the second half of the batch is unconditional (fake_latent), same tokens and mask
            c2 = self.conditions(torch.cat([tokens, tokens]), torch.cat([mask, mask]),
                                 torch.cat([cls, self.fake_latent.expand(B, -1)]), n_masked=n_masked)  # (2B, L, Dd)
            c2 = gather_rows(c2, torch.cat([pos, pos])).flatten(0, 1)  # (2B k, Dd): image-major, ascending position
            c, c_null = c2.chunk(2)  # (B k, Dd) each
        else:
            c, c_null = gather_rows(self.conditions(tokens, mask, cls, n_masked=n_masked), pos).flatten(0, 1), None
        x0 = head(self.diffloss, c, c_null, cfg, noise).to(tokens.dtype).reshape(B, k, -1)  # (B, k, C)
        # Out-of-place write of the new tokens: differentiable into both the old tokens and x0.
        return tokens.scatter(1, pos[..., None].expand(-1, -1, tokens.shape[-1]), x0)


# ==== Presets: the released models (with their released heads) and small ones for tests and the toy =============

def mar_tiny(**kw):
    """Tests and smoke runs: 2+2 blocks of width 64, head 2 x 96."""
    cfg = dict(encoder_embed_dim=64, encoder_depth=2, encoder_num_heads=4, decoder_embed_dim=64, decoder_depth=2,
               decoder_num_heads=4, diffloss_d=2, diffloss_w=96)
    return MAR(**{**cfg, **kw})


def mar_base(**kw):
    """MAR-B: 12+12 blocks of 768, 12 heads; released head 6 x 1024. 207,924,768 parameters."""
    cfg = dict(encoder_embed_dim=768, encoder_depth=12, encoder_num_heads=12, decoder_embed_dim=768,
               decoder_depth=12, decoder_num_heads=12, diffloss_d=6, diffloss_w=1024)
    return MAR(**{**cfg, **kw})


def mar_large(**kw):
    """MAR-L: 16+16 blocks of 1024, 16 heads; released head 8 x 1280. 478,326,304 parameters."""
    cfg = dict(encoder_embed_dim=1024, encoder_depth=16, encoder_num_heads=16, decoder_embed_dim=1024,
               decoder_depth=16, decoder_num_heads=16, diffloss_d=8, diffloss_w=1280)
    return MAR(**{**cfg, **kw})


def mar_huge(**kw):
    """MAR-H: 20+20 blocks of 1280, 16 heads; released head 12 x 1536. 942,403,104 parameters."""
    cfg = dict(encoder_embed_dim=1280, encoder_depth=20, encoder_num_heads=16, decoder_embed_dim=1280,
               decoder_depth=20, decoder_num_heads=16, diffloss_d=12, diffloss_w=1536)
    return MAR(**{**cfg, **kw})


PRESETS = {"mar_tiny": mar_tiny, "mar_base": mar_base, "mar_large": mar_large, "mar_huge": mar_huge}


# ==== Checkpoint loading (official MAR files and ours) ============================================================

def read_checkpoint(path):
    """torch.load(weights_only=True) with errors that say what is wrong with the file.

    Official MAR training checkpoints also pickle `args` as an argparse.Namespace; weights_only refuses any class
    outside its allow-list, so Namespace (a plain attribute bag, nothing executed) is allowed here and nothing else.
    """
    if os.path.isdir(path):
        raise IsADirectoryError(f"checkpoint {path!r} is a folder; give the checkpoint file in it")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist; weights are never downloaded, give a local path")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" not in str(e):  # not a pickle of tensors at all (random bytes, another format)
            raise RuntimeError(f"{path!r} is not a torch checkpoint (unreadable as one); give a checkpoint file") from e
        # an object outside the allow-list: the file is a checkpoint, but not of plain tensors
        raise RuntimeError(f"checkpoint {path!r} holds Python objects that weights_only loading refuses. Re-save its "
                           "tensors, e.g. torch.save({'model': sd}, new_path), from a trusted environment") from e
    except Exception as e:  # truncated zip
        raise RuntimeError(f"could not read checkpoint {path!r} ({type(e).__name__}: {str(e)[:200]}); "
                           "is the file complete and a torch checkpoint?") from e


def load_state_dict_strict(module, sd, what="checkpoint", hint="Check --model / --preset"):
    """load_state_dict(strict=True), but the error names the first missing, unexpected and mis-shaped keys, then
    `hint` (what the user should check)."""
    own = module.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shape = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or shape:
        raise ValueError(f"{what} does not fit the model ({len(missing)} missing, {len(unexpected)} unexpected, "
                         f"{len(shape)} mis-shaped keys). First missing: {missing[:3]}; first unexpected: "
                         f"{unexpected[:3]}; first mis-shaped: {shape[:3]}. {hint}")
    module.load_state_dict(sd, strict=True)


def checkpoint_kind(ckpt):
    """The "kind" a checkpoint's writer recorded ("student": distill_gsim.py / rl_refine.py; "teacher": train_mar.py);
    the official MAR files record none and are teachers."""
    return ckpt.get("kind", "teacher")


def load_mar(path, model, use_ema=True, verbose=True, expect=None):
    """Load an official MAR `checkpoint-last.pth` ({"model", "model_ema"}) or one of ours into `model`, strictly.

    EMA weights by default (what the official demo and evaluation use); falls back to "model" if there is no EMA.
    expect: "teacher" or "student" to refuse the other kind (`checkpoint_kind`). Returns the model.
    """
    ckpt = read_checkpoint(path)
    if not isinstance(ckpt, dict) or not ({"model", "model_ema"} & set(ckpt)):
        bare = isinstance(ckpt, dict) and ckpt and all(torch.is_tensor(v) for v in ckpt.values())  # weights alone
        raise ValueError(f"{path!r} is " + ("a bare state dict: save it as {'model': sd, 'kind': 'teacher' or "
                         "'student'}" if bare else "not a MAR checkpoint: expected a dict with 'model' / 'model_ema'"))
    kind = checkpoint_kind(ckpt)
    if expect is not None and kind != expect:
        made = {"student": "a MARVAL one-step student (distill_gsim.py / rl_refine.py)",
                "teacher": "a MAR teacher (official or train_mar.py)"}.get(kind, f"a {kind!r} checkpoint")
        raise ValueError(f"this is {made}, not a {expect}")
    key = "model_ema" if use_ema and "model_ema" in ckpt else "model"
    load_state_dict_strict(model, ckpt[key], f"{path!r} [{key}]")
    if verbose and os.environ.get("RANK", "0") == "0":  # rank 0 only under torchrun, without torch.distributed here
        print(f"loaded {key} weights from {path}", flush=True)
    return model
