"""KL-16 autoencoder: the image tokenizer of MAR (LDM's AutoencoderKL, Rombach et al. 2022, arXiv:2112.10752).

MAR (arXiv:2406.11838) retrained LDM's KL-f16 autoencoder on ImageNet with embed_dim 16 and removed the attention of
the decoder's up path to save memory (MAR issue #73): a 256x256 image becomes a 16x16x16 latent, i.e. 256 tokens of
16 values. This file is inference-only and state-dict compatible with MAR's `kl16.ckpt` (keys listed in
../shared/reference/kl16_vae_keys.txt).

    import vae
    ae = vae.load_vae("pretrained_models/vae/kl16.ckpt")      # AutoencoderKL with MAR's configuration
    post = ae.encode(images)                                 # images (B, 3, 256, 256) in [-1, 1]
    latents = post.sample() * 0.2325                         # MAR's scale: latent std ~ 1
    images = ae.decode(latents / 0.2325)                     # (B, 3, 256, 256), about [-1, 1]

Building blocks, all written here: ResnetBlock (GN-swish-conv twice, 1x1 `nin_shortcut` when the width changes),
single-head spatial self-attention (AttnBlock), Downsample (asymmetric pad + stride-2 conv), Upsample (nearest x2 +
conv). GroupNorm(32 groups, eps 1e-6) everywhere.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import print0
from mar import load_state_dict_strict, read_checkpoint


def Normalize(channels):
    # GroupNorm with 32 groups: every width in the KL-16 (128, 256, 512) is a multiple of 32, and so is the test
    # model's 32/64. eps 1e-6 (not torch's 1e-5) is part of parity.
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels, out_channels, dropout=0.0):
        super().__init__()
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # a 1x1 projection on the skip path only where the width changes; the name matches kl16.ckpt's keys
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x):
        # pre-activation residual block; there is no timestep input (LDM's temb_channels = 0 for the autoencoder)
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, 1x1 conv projections, residual."""

    def __init__(self, channels):
        super().__init__()
        self.norm = Normalize(channels)
        self.q, self.k, self.v = (nn.Conv2d(channels, channels, 1) for _ in range(3))
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        # (B, C, H, W) -> (B, 1, HW, C): one head, softmax(q k^T / sqrt(C)) v
        q, k, v = (f(h).reshape(B, 1, C, H * W).transpose(2, 3) for f in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C)
        return x + self.proj_out(h.transpose(2, 3).reshape(B, C, H, W))


class Downsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        # padding=0 here and an explicit (0, 1, 0, 1) pad in forward: halves H and W exactly for even sizes
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric zero pad (right, bottom), as in LDM


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Encoder(nn.Module):
    """Image (B, 3, R, R) -> moments (B, 2 z, R / 2^(levels-1), ...). Attention after each res block at the
    resolutions in `attn_resolutions`, and in the middle block."""

    def __init__(self, ch, ch_mult, num_res_blocks, attn_resolutions, resolution, z_channels, in_channels=3):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        # One "level" per entry of ch_mult: num_res_blocks ResnetBlocks (+ attention at the listed resolutions),
        # then a stride-2 Downsample except after the last level. KL-16: 256 -> 128 -> 64 -> 32 -> 16.
        self.down = nn.ModuleList()
        res, block_in = resolution, ch
        for i, mult in enumerate(ch_mult):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks):
                level.block.append(ResnetBlock(block_in, ch * mult))
                block_in = ch * mult
                if res in attn_resolutions:
                    level.attn.append(AttnBlock(block_in))
            if i != len(ch_mult) - 1:
                level.downsample = Downsample(block_in)
                res //= 2
            self.down.append(level)
        self.mid = nn.Module()
        self.mid.block_1, self.mid.attn_1, self.mid.block_2 = (ResnetBlock(block_in, block_in), AttnBlock(block_in),
                                                               ResnetBlock(block_in, block_in))
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels, 3, padding=1)  # mean and log-variance

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            for i, block in enumerate(level.block):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[i](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent (B, z, r, r) -> image (B, 3, r * 2^(levels-1), ...). num_res_blocks + 1 blocks per level; attention
    only in the middle block (MAR's KL-16 has none in the up path)."""

    def __init__(self, ch, ch_mult, num_res_blocks, z_channels, out_channels=3):
        super().__init__()
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1, self.mid.attn_1, self.mid.block_2 = (ResnetBlock(block_in, block_in), AttnBlock(block_in),
                                                               ResnetBlock(block_in, block_in))
        # Mirror of the encoder with one more block per level. The levels are built from the lowest resolution
        # up, but stored so that `up.{i}` matches the encoder's `down.{i}` (the checkpoint's naming).
        ups = []
        for i in reversed(range(len(ch_mult))):  # built from the lowest resolution up, stored as up.{i}
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                level.block.append(ResnetBlock(block_in, ch * ch_mult[i]))
                block_in = ch * ch_mult[i]
            if i != 0:
                level.upsample = Upsample(block_in)
            ups.insert(0, level)
        self.up = nn.ModuleList(ups)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_channels, 3, padding=1)

    def forward(self, z):
        # (B, z, 16, 16) -> mid block at the lowest resolution -> levels 4..0, upsampling between them
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussian:
    """The encoder's posterior N(mean, exp(logvar)), logvar clamped to [-30, 20] as in LDM."""

    def __init__(self, moments):
        self.moments = moments  # (B, 2 z, h, w): what MAR's latent cache stores
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = (0.5 * self.logvar).exp()

    def sample(self, generator=None):
        """mean + std * eps. MAR trains on SAMPLES of the posterior (not the mode), times 0.2325."""
        kw = {"generator": generator, "device": generator.device} if generator is not None else {}
        kw.setdefault("device", self.mean.device)
        return self.mean + self.std * torch.randn(self.mean.shape, **kw).to(self.mean.device)

    def mode(self):
        return self.mean

    def kl(self):
        """KL(N(mean, std^2) || N(0, 1)) per latent value (Kingma & Welling 2014, appendix B), the same tensor shape
        as the mean; LDM sums it over the latent, the toy VAE averages it."""
        return 0.5 * (self.mean ** 2 + self.std ** 2 - 1 - self.logvar)


class AutoencoderKL(nn.Module):
    """MAR's KL-16 by default (66,456,019 parameters). `attn_resolutions` applies to the encoder only."""

    def __init__(self, embed_dim=16, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,),
                 resolution=256, z_channels=None):
        super().__init__()
        z_channels = embed_dim if z_channels is None else z_channels  # tied, as in MAR's KL constructor
        # quant_conv maps the encoder's 2 z moments to 2 embed_dim; post_quant_conv maps embed_dim back to z. For
        # MAR's KL-16 both widths are 16, so they are plain 1x1 mixing layers, kept for checkpoint compatibility.
        self.encoder = Encoder(ch, ch_mult, num_res_blocks, attn_resolutions, resolution, z_channels)
        self.decoder = Decoder(ch, ch_mult, num_res_blocks, z_channels)
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)

    def encode(self, x):
        """x (B, 3, H, W) in [-1, 1] -> DiagonalGaussian over latents (B, embed_dim, H/16, W/16)."""
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z):
        """Unscaled latents (B, embed_dim, h, w) -> images (B, 3, 16h, 16w), roughly in [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))


def config_from_state_dict(sd):
    """AutoencoderKL keywords read off a state dict's shapes, so any LDM KL autoencoder file loads without flags
    (MAR's kl16.ckpt gives exactly the defaults: ch 128, ch_mult (1, 1, 2, 2, 4), 2 blocks, attention at 16)."""
    ch = sd["encoder.conv_in.weight"].shape[0]
    levels = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.down."))
    blocks = 1 + max(int(k.split(".")[4]) for k in sd if k.startswith("encoder.down.0.block."))
    ch_mult = tuple(sd[f"encoder.down.{i}.block.{blocks - 1}.conv2.weight"].shape[0] // ch for i in range(levels))
    # attention levels by index; a nominal resolution of 2^levels * 16 maps level i to resolution (16 * 2^levels) >> i
    res = 16 * 2 ** (levels - 1)
    attn = tuple(res >> i for i in range(levels) if f"encoder.down.{i}.attn.0.q.weight" in sd)
    return dict(embed_dim=sd["post_quant_conv.weight"].shape[1], ch=ch, ch_mult=ch_mult, num_res_blocks=blocks,
                attn_resolutions=attn, resolution=res, z_channels=sd["decoder.conv_in.weight"].shape[1])


def load_vae(path, model=None, **config):
    """Load `kl16.ckpt` ({"model": state_dict}) into `model` (default: AutoencoderKL with the architecture read off
    the file's shapes, overridden by `config`), strictly for the encoder/decoder/quant keys. Training-only extras
    (LDM's loss / discriminator) are dropped and counted."""
    ckpt = read_checkpoint(path)
    sd = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict) or not any(k.startswith("encoder.") for k in sd):
        raise ValueError(f"{path!r} is not a KL autoencoder checkpoint: expected {{'model': state_dict}} with "
                         "'encoder.*' / 'decoder.*' keys")
    prefixes = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
    kept = {k: v for k, v in sd.items() if k.startswith(prefixes)}
    if model is None:
        try:
            inferred = config_from_state_dict(kept)
        except (KeyError, ValueError) as e:  # too broken to read its shape: the strict load below names the keys
            inferred = {}
            print0(f"VAE {path!r}: could not read the architecture off the file ({e}); using KL-16's")
        model = AutoencoderKL(**{**inferred, **config})
    load_state_dict_strict(model, kept, f"VAE {path!r}", "Is it MAR's kl16.ckpt (an LDM KL autoencoder)?")
    extra = len(sd) - len(kept)
    print0(f"loaded VAE from {path}" + (f" (ignored {extra} training-only keys)" if extra else ""))
    return model.eval()


# ----------------------------------------------------------------------------------------------------------------
# The toy's tokenizer: KL-16 in miniature
# ----------------------------------------------------------------------------------------------------------------

# MAR never sees pixels: it generates KL-16 latents (256 tokens of 16 values at stride 16, scaled to unit variance
# by 0.2325) and the VAE decodes them. The toy keeps that shape: a 16x16 digit becomes a 4x4 grid of 16-channel
# latents (stride 4), i.e. 16 tokens of 16 values, the token width of KL-16, and the decoder turns generated latents
# back into pixels. Plain convolutions instead of KL-16's GroupNorm ResNet blocks: those blocks at toy size (a
# 1-channel AutoencoderKL, ch 32, ch_mult (1, 2, 2)) trained 9x slower per step on 2 cores (512 s for 1,500 steps
# against 37 s for 1,000) for a reconstruction no better (toy FID of held-out reconstructions 0.19 vs 0.10 here; the
# real-split floor is 3.31). The objective is KL-16's without its
# perceptual and adversarial terms: reconstruction + a small KL to N(0, I), so the posterior is a Gaussian whose
# samples the MAR is trained on, and the decoder learns to tolerate latent noise of that size.
TOY_VAE_CHANNELS = 16


class ToyVAE(nn.Module):
    """(B, 1, 16, 16) digits in [-1, 1] <-> (B, 16, 4, 4) latents; `encode` returns a DiagonalGaussian as
    AutoencoderKL does. Two buffers are saved with the weights: `scale`, the toy's 0.2325 (1 / std of the training
    latents, so MAR's tokens have unit variance), and `latent_bound`, the largest |scaled latent| of the training
    split, the range the teacher's sampler clips x0 to (gaussian_diffusion.clip_x0)."""

    def __init__(self, channels=TOY_VAE_CHANNELS, width=16):
        super().__init__()
        w = width
        # 16x16 -> 8x8 -> 4x4 with stride-2 4x4 convolutions; the last 1x1 conv gives mean and log-variance
        self.encoder = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.SiLU(), nn.Conv2d(w, 2 * w, 4, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(2 * w, 4 * w, 4, stride=2, padding=1), nn.SiLU(), nn.Conv2d(4 * w, 2 * channels, 1))
        # the mirror image: 4x4 -> 8x8 -> 16x16 with transposed convolutions; no output squashing (KL-16 has none)
        self.decoder = nn.Sequential(
            nn.Conv2d(channels, 4 * w, 3, padding=1), nn.SiLU(),
            nn.ConvTranspose2d(4 * w, 2 * w, 4, stride=2, padding=1), nn.SiLU(),
            nn.ConvTranspose2d(2 * w, w, 4, stride=2, padding=1), nn.SiLU(), nn.Conv2d(w, 1, 3, padding=1))
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("latent_bound", torch.tensor(4.0))  # both set by train_toy_vae

    def encode(self, x):
        return DiagonalGaussian(self.encoder(x))

    def decode(self, z):
        """Unscaled latents (B, 16, 4, 4) -> digits (B, 1, 16, 16), about [-1, 1]."""
        return self.decoder(z)


@torch.enable_grad()  # callers may be inside no_grad
def train_toy_vae(x, x_heldout, steps=1000, seed=0, kl_weight=1e-3, verbose=True):
    """Train on the digits x (N, 1, 16, 16) (the toy's training split: 37 s on 2 cores), set `scale` and
    `latent_bound`, report the reconstruction error on x_heldout.

    Loss per batch: mean squared error of decode(posterior sample) + kl_weight * KL(q(z|x) || N(0, I)) per latent
    value. KL-16 trains with weight 1e-6 on a summed KL beside perceptual and GAN losses; 1e-3 on the mean here gives
    the same regime: the KL keeps the latents near unit scale (scale ~1.04) and the posterior noise small (std 0.23
    of the latents' spread), reconstructions near exact."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = ToyVAE()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    for _ in range(steps):
        xb = x[torch.randint(0, len(x), (64,), generator=g)]
        post = model.encode(xb)
        loss = F.mse_loss(model.decode(post.sample(g)), xb) + kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        z = model.encode(x).sample(g)
        model.scale.fill_(1.0 / z.std().item())  # MAR's 0.2325, measured the same way
        model.latent_bound.fill_((z * model.scale).abs().max().item())
        err = F.mse_loss(model.decode(model.encode(x_heldout).mean), x_heldout).item()
    if verbose:
        print0(f"toy VAE: held-out reconstruction MSE {err:.5f}, scale {model.scale.item():.4f}, "
               f"latent range +-{model.latent_bound.item():.2f}")
    return model.requires_grad_(False)
