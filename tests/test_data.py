"""data.py: the toy digits and the toy VAE tokenizer, the class-folder reader, the latent cache."""
import argparse

import numpy as np
import pytest
import torch
from PIL import Image

import data
import mar
import vae


def test_toy_digits_split_and_range():
    xt, yt = data.toy_digits("train")
    xh, yh = data.toy_digits("heldout")
    assert xt.shape == (1400, 1, 16, 16) and xh.shape == (397, 1, 16, 16)
    assert xt.min() >= -1 and xt.max() <= 1 and xt.min() == -1  # background is exactly -1
    assert set(yt.tolist()) == set(range(10)) and set(yh.tolist()) == set(range(10))
    # the split is fixed and disjoint: no held-out image appears in the training split
    flat_t = {tuple(v) for v in xt.flatten(1).numpy().round(4).tolist()}
    assert sum(tuple(v) in flat_t for v in xh.flatten(1).numpy().round(4).tolist()) <= 2  # sklearn has ~1 duplicate
    assert torch.equal(data.toy_digits("heldout")[0], xh)


def test_toy_latents_have_the_kl16_token_width():
    model, ae = mar.MAR(**data.TOY_MODEL), vae.ToyVAE()
    x, _ = data.toy_digits("heldout")
    z = ae.encode(x[:4]).mean
    assert z.shape == (4, 16, 4, 4)                    # stride 4, 16 channels
    tokens = model.patchify(z)
    assert tokens.shape == (4, 16, 16)                 # 16 tokens of 16 values, like KL-16's 256 tokens of 16
    torch.testing.assert_close(tokens[0, 5], z[0, :, 1, 1])  # token 5 = latent row 1, column 1
    assert ae.decode(z).shape == x[:4].shape


@pytest.fixture(scope="module")
def trained_toy_vae():
    return vae.train_toy_vae(data.toy_digits("train")[0], data.toy_digits("heldout")[0], steps=150, verbose=False)


def test_toy_vae_reconstructs_and_has_unit_variance_latents(trained_toy_vae):
    """150 of the 1,000 default steps already reconstruct the held-out digits (an untrained or broken decoder is
    ~50x worse); `scale` makes the training latents unit-variance, as 0.2325 does for KL-16, and `latent_bound` is
    their range."""
    x, _ = data.toy_digits("train")
    xh, _ = data.toy_digits("heldout")
    tok = data.toy_tokenizer(trained_toy_vae)
    with torch.no_grad():
        err = (tok.decode(tok.encode(xh, torch.Generator().manual_seed(1))) - xh).square().mean().item()
        untrained = (vae.ToyVAE().decode(vae.ToyVAE().encode(xh).mean) - xh).square().mean().item()
        z = tok.encode(x, torch.Generator().manual_seed(2))  # a fresh posterior sample, scaled
    assert err < 0.05 * xh.var().item() and untrained > 0.5 * xh.var().item(), (err, untrained)
    assert abs(z.std().item() - 1) < 0.03 and abs(tok.scale - 1) > 1e-3  # the scale is measured, not 1 by default
    assert tok.x0_bound == pytest.approx(trained_toy_vae.latent_bound.item())
    assert 0.8 * tok.x0_bound < z.abs().max().item() < 1.25 * tok.x0_bound


def test_toy_tokenizer_travels_in_the_checkpoint(trained_toy_vae, tmp_path):
    """A toy checkpoint decodes with the VAE saved inside it; one without it is refused with a clear message."""
    import common
    path = str(tmp_path / "ck.pth")
    common.save_checkpoint(path, {"model": {}, "toy_vae": trained_toy_vae.state_dict()})
    tok = data.toy_tokenizer_of(path)
    for k, v in trained_toy_vae.state_dict().items():
        assert torch.equal(tok.vae.state_dict()[k], v), k
    assert tok.scale == pytest.approx(trained_toy_vae.scale.item())
    common.save_checkpoint(path, {"model": {}})
    with pytest.raises(ValueError, match="no 'toy_vae' entry.*train_mar.py --preset toy"):
        data.toy_tokenizer_of(path)


def test_clip_x0_bounds():
    from gaussian_diffusion import clip_x0
    x = torch.linspace(-10, 10, 21)
    assert torch.equal(clip_x0(x, False), x) and torch.equal(clip_x0(x, None), x)  # MAR: unbounded latents
    assert clip_x0(x, True).abs().max() == 1 and clip_x0(x, 3.5).abs().max() == 3.5
    assert torch.equal(clip_x0(x, 3.5)[7:14], x[7:14])  # values inside the bound are untouched


def write_images(root, sizes):
    for c, (w, h) in enumerate(sizes):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        arr = np.random.default_rng(c).integers(0, 255, (h, w, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / f"class{c}" / f"img{c}.png")


def test_image_folder_crops_to_size(tmp_path):
    write_images(tmp_path, [(300, 200), (600, 700)])
    ds = data.ImageFolder(str(tmp_path), image_size=64, flip=False)
    assert ds.classes == ["class0", "class1"] and len(ds) == 2
    x, label = ds[1]
    assert x.shape == (3, 64, 64) and label == 1 and x.min() >= -1 and x.max() <= 1


def test_empty_or_missing_image_folder_is_a_clear_error(tmp_path):
    (tmp_path / "class0").mkdir()
    (tmp_path / "class0" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="no images found"):
        data.ImageFolder(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.ImageFolder(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="notes.txt' is not a cache entry"):  # a stray file, by path
        data.CachedLatents(str(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no cached latents"):
        data.CachedLatents(str(tmp_path / "empty"))


def test_latent_cache_roundtrip(tmp_path, monkeypatch):
    """`data.py cache` with a small random VAE: the stored moments are the VAE's moments of the image and of its
    mirror image, and CachedLatents returns one of the two."""
    write_images(tmp_path / "imgs", [(40, 40), (50, 40)])
    torch.manual_seed(0)
    small = vae.AutoencoderKL(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), resolution=32).eval()
    monkeypatch.setattr(vae, "load_vae", lambda path: small)
    args = argparse.Namespace(data_path=str(tmp_path / "imgs"), vae="unused", out_dir=str(tmp_path / "cache"),
                              img_size=32, batch_size=2, device="cpu", num_workers=0, bad_images="stop")
    data.cache_latents(args)
    ds = data.CachedLatents(str(tmp_path / "cache"))
    assert len(ds) == 2
    img = data.ImageFolder(str(tmp_path / "imgs"), 32, flip=False)
    x, label = img.load(0)
    with torch.no_grad():
        want = small.encode(x[None]).moments[0]
        want_flip = small.encode(x.flip(-1)[None]).moments[0]
    # the loader's (index, flip) pair picks the image or its mirror: the coin comes from the seeded epoch generator
    m, y = ds[(0, False)]
    assert y == label and torch.allclose(m, want, atol=1e-5)
    m, y = ds[(0, True)]
    assert y == label and torch.allclose(m, want_flip, atol=1e-5)
    assert not torch.allclose(want, want_flip, atol=1e-3)  # the two really differ
    z = data.Tokenizer(small).latents_from_moments(m[None], torch.Generator().manual_seed(0))
    assert z.shape == (1, 16, 16, 16)


def test_epoch_flips_are_seeded_and_mixed(tmp_path):
    """Flips come from (seed, epoch) with the permutation: the same every time (resume is exact), about half
    flipped, different in another epoch; a worker's own RNG is never used."""
    idx, flips = data.epoch_batches(1000, 100, 2, 1, seed=3, epoch=0)
    idx2, flips2 = data.epoch_batches(1000, 100, 2, 1, seed=3, epoch=0)
    assert idx.shape == flips.shape == (10, 50)
    assert torch.equal(idx, idx2) and torch.equal(flips, flips2)
    assert 0.4 < flips.float().mean() < 0.6
    assert not torch.equal(flips, data.epoch_batches(1000, 100, 2, 1, seed=3, epoch=1)[1])
    write_images(tmp_path, [(40, 40), (40, 40)])
    ds = data.ImageFolder(str(tmp_path), image_size=32, flip=True)
    assert torch.equal(ds[(1, True)][0], ds[(1, False)][0].flip(-1))
    assert torch.equal(ds[1][0], ds.load(1)[0])  # a plain index: no flip


def test_posterior_kl_matches_torch_distributions():
    m = torch.randn(2, 8, 3, 3)
    post = vae.DiagonalGaussian(m)
    want = torch.distributions.kl_divergence(torch.distributions.Normal(post.mean, post.std),
                                             torch.distributions.Normal(0.0, 1.0))
    torch.testing.assert_close(post.kl(), want)
