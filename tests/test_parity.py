"""Parity with the official MAR code: ../shared/testdata/mar_reference_small.pt was produced by running LTH14/mar's
modules with random weights. Every check is to 1e-5 (relative and absolute); the reference holds some inf values
(random heads give huge variances) and assert_close requires them at the same places."""
import pytest
import torch

import mar
import vae
from conftest import shared_file

def close(actual, expected, msg=None):
    """assert_close at 1e-5, the absolute part scaled by the tensor's largest finite magnitude: random weights give
    outputs up to ~1e4, where float32 summation order (it depends on the BLAS thread count) moves single elements
    by 1e-4 relative. inf entries must match exactly."""
    finite = expected[torch.isfinite(expected)]
    scale = max(1.0, finite.abs().max().item()) if finite.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * scale, msg=msg)


@pytest.fixture(scope="module")
def model(reference):
    m = mar.MAR(**reference["config"]).eval()
    m.load_state_dict(reference["mar_checkpoint"]["model"], strict=True)
    return m


@pytest.fixture(scope="module")
def autoencoder(reference):
    ae = vae.AutoencoderKL(embed_dim=16, **reference["vae_config"]).eval()
    ae.load_state_dict(reference["vae_checkpoint"]["model"], strict=True)
    return ae


def test_state_dict_keys_and_order_match(reference, model):
    ref = reference["mar_checkpoint"]["model"]
    assert list(model.state_dict()) == list(ref)  # same names in the same order
    assert all(model.state_dict()[k].shape == v.shape for k, v in ref.items())


@torch.no_grad()
def test_patchify_and_unpatchify(reference, model):
    close(model.patchify(reference["latent_image"]), reference["patchified"])
    close(model.unpatchify(reference["patchified"]), reference["unpatchified"])


@torch.no_grad()
def test_encoder_and_decoder_outputs(reference, model):
    enc = model.forward_mae_encoder(reference["tokens"], reference["mask"], model.class_emb(reference["labels"]))
    close(enc, reference["encoder_out"])
    dec = model.forward_mae_decoder(reference["encoder_out"], reference["mask"])
    close(dec, reference["decoder_out"])


@torch.no_grad()
def test_head_and_forward_with_cfg(reference, model):
    r = reference
    close(model.diffloss.net(r["head_xt"], r["head_t"], r["head_c"]), r["head_out"])
    out = model.diffloss.net.forward_with_cfg(r["cfg_xt"], r["cfg_t"], r["cfg_c"], r["cfg_scale"])
    close(out, r["cfg_out"])


@torch.no_grad()
def test_guided_eps_equals_official_cfg_on_first_half(reference, model):
    """Our one-trajectory CFG (used by the sampler) gives the official forward_with_cfg's first half."""
    r = reference
    n = len(r["cfg_xt"]) // 2
    official = model.diffloss.net.forward_with_cfg(r["cfg_xt"], r["cfg_t"], r["cfg_c"], r["cfg_scale"])[:n]
    ours = mar.guided_eps(model.diffloss.net, r["cfg_xt"][:n], r["cfg_t"][:n], r["cfg_c"][:n], r["cfg_c"][n:],
                                     float(r["cfg_scale"]))
    close(ours, official)


def test_schedules(reference):
    d = mar.GaussianDiffusion(1000)
    torch.testing.assert_close(d.alphas_cumprod, reference["alphas_cumprod"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(d.betas, reference["betas"], rtol=1e-12, atol=1e-12)
    for n in (10, 100):
        g = mar.GaussianDiffusion(1000, str(n))
        assert g.timestep_map.tolist() == reference[f"respaced_{n}_timestep_map"].tolist()
        torch.testing.assert_close(g.betas, reference[f"respaced_{n}_betas"], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n", [10, 100])
@torch.no_grad()
def test_reverse_step_mean_and_variance(reference, model, n):
    r, g = reference, mar.GaussianDiffusion(1000, str(n))
    t = r[f"respaced_{n}_pmv_t"]  # indices of the respaced process; the head sees the original steps
    out = model.diffloss.net(r["head_xt"], g.timestep_map[t], r["head_c"])
    p = g.p_mean_variance(out, r["head_xt"], t)
    for k in ("mean", "log_variance", "pred_xstart"):
        close(p[k], r[f"respaced_{n}_pmv_{k}"], msg=k)
    # variance = exp(log variance) spans 1e-44 .. inf with random weights: compared on the log scale
    close(p["variance"].log(), r[f"respaced_{n}_pmv_variance"].log(), msg="variance")


@torch.no_grad()
def test_training_loss_terms(reference, model):
    r = reference
    d = model.diffloss.train_diffusion
    losses = d.training_losses(model.diffloss.net, r["loss_x0"], r["loss_t"], r["head_c"], r["loss_noise"])
    for ours, theirs in (("mse", "mse"), ("vb", "vb"), ("loss", "total")):
        close(losses[ours], r[f"loss_{theirs}"], msg=ours)


@torch.no_grad()
def test_vae_moments_and_decode(reference, autoencoder):
    r = reference
    post = autoencoder.encode(r["vae_image"])
    close(post.moments, r["vae_moments"])
    close(post.mean, r["vae_mean"])
    close(post.std, r["vae_std"])
    close(autoencoder.decode(r["vae_latent"]), r["vae_decoded"])


def test_load_mar_and_load_vae_from_files(reference, tmp_path):
    """The real loading code on files in the official layouts: EMA by default, strict."""
    ck = reference["mar_checkpoint"]
    ema = {k: v + 1.0 for k, v in ck["model"].items()}  # make EMA distinguishable from the live weights
    torch.save({"model": ck["model"], "model_ema": ema}, tmp_path / "checkpoint-last.pth")
    m = mar.load_mar(str(tmp_path / "checkpoint-last.pth"), mar.MAR(**reference["config"]))
    assert torch.equal(m.fake_latent, ema["fake_latent"])
    m = mar.load_mar(str(tmp_path / "checkpoint-last.pth"), mar.MAR(**reference["config"]), use_ema=False)
    assert torch.equal(m.fake_latent, ck["model"]["fake_latent"])
    # kl16.ckpt may carry LDM training-only keys: they are dropped, the rest must fit exactly
    sd = dict(reference["vae_checkpoint"]["model"], **{"loss.logvar": torch.zeros(())})
    torch.save({"model": sd}, tmp_path / "kl16.ckpt")
    ae = vae.load_vae(str(tmp_path / "kl16.ckpt"), embed_dim=16, **reference["vae_config"])
    assert torch.equal(ae.quant_conv.weight, sd["quant_conv.weight"])


def test_reference_key_lists_for_released_models():
    """MAR-B/L/H and KL-16 built here have every key and shape of the released checkpoints, in order, and the
    released parameter counts (built on the meta device: no memory, no init cost)."""
    cases = [("mar_base_d6_w1024_keys.txt", mar.mar_base, 207_924_768),
             ("mar_large_d8_w1280_keys.txt", mar.mar_large, 478_326_304),
             ("mar_huge_d12_w1536_keys.txt", mar.mar_huge, 942_403_104),
             ("kl16_vae_keys.txt", vae.AutoencoderKL, 66_456_019)]
    for fname, build, count in cases:
        lines = shared_file("reference", fname).read_text().splitlines()
        expected = [(n, tuple(int(x) for x in s.strip("()").split(",") if x.strip()))
                    for n, s in (line.split("\t") for line in lines if line and not line.startswith("#"))]
        with torch.device("meta"):
            model = build()
        got = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
        assert got == expected, fname
        assert sum(p.numel() for p in model.parameters()) == count, fname
