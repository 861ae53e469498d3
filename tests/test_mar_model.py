"""MAR training loss, masking, loading errors and the shared helpers."""
import random

import numpy as np
import pytest
import scipy.stats
import torch

import common
import gaussian_diffusion
import mar
import vae
from conftest import randomize_


def small(**kw):
    cfg = dict(img_size=4, vae_stride=1, patch_size=1, class_num=10, buffer_size=4, num_sampling_steps="10")
    return mar.mar_tiny(**{**cfg, **kw})


def test_patchify_roundtrip_with_patches():
    m = small(img_size=8, patch_size=2, vae_embed_dim=4)  # 16 tokens of 4*2*2 = 16 values
    x = torch.randn(3, 4, 8, 8)
    tokens = m.patchify(x)
    assert tokens.shape == (3, 16, 16)
    torch.testing.assert_close(tokens[0, 1], x[0, :, 0:2, 2:4].reshape(-1))  # token (0,1) laid out (c, p, p)
    torch.testing.assert_close(m.unpatchify(tokens), x)


def test_truncnorm_mask_ratio_matches_scipy():
    rng = random.Random(0)
    draws = np.array([mar.truncnorm_mask_ratio(0.7, rng.random()) for _ in range(4000)])
    ref = scipy.stats.truncnorm(a=(0.7 - 1) / 0.25, b=0, loc=1.0, scale=0.25)
    assert draws.min() >= 0.7 and draws.max() <= 1.0
    assert scipy.stats.kstest(draws, ref.cdf).pvalue > 1e-3
    assert abs(draws.mean() - 0.867) < 0.01


def test_random_masking_counts():
    m = small()
    orders = m.sample_orders(5, torch.Generator().manual_seed(0))
    assert all(sorted(o.tolist()) == list(range(16)) for o in orders)
    mask = m.random_masking(orders, m.num_masked(0.7))
    assert mask.sum(1).tolist() == [12.0] * 5  # ceil(16 * 0.7) = 12, the same in every row
    assert torch.all(mask.gather(1, orders[:, :12]) == 1)  # the first positions of each order are masked


def test_training_loss_is_masked_mean_of_per_row_terms():
    """forward = masked mean over diffusion_batch_mul tiled copies of MSE + vb, with the generator's t and noise."""
    torch.manual_seed(0)
    m = randomize_(small(diffusion_batch_mul=2, label_drop_prob=0.0)).train()
    m.encoder_blocks.apply(lambda mod: setattr(mod, "p", 0.0) if isinstance(mod, torch.nn.Dropout) else None)
    m.decoder_blocks.apply(lambda mod: setattr(mod, "p", 0.0) if isinstance(mod, torch.nn.Dropout) else None)
    for blk in list(m.encoder_blocks) + list(m.decoder_blocks):
        blk.attn.attn_drop = 0.0
    x, y = torch.randn(3, 16, 4, 4), torch.tensor([1, 2, 3])
    loss = m(x, y, generator=torch.Generator().manual_seed(7))
    # replay the same draws by hand
    g = torch.Generator().manual_seed(7)
    gt = m.patchify(x)
    orders = m.sample_orders(3, g)
    mask = m.random_masking(orders, m.num_masked(generator=g))
    z = m.conditions(gt, mask, m.class_emb(y), g).reshape(-1, 64).repeat(2, 1)
    target, w = gt.reshape(-1, 16).repeat(2, 1), mask.reshape(-1).repeat(2)
    t = torch.randint(0, 1000, (len(target),), generator=g)
    noise = torch.randn(target.shape, generator=g)
    rows = m.diffloss.train_diffusion.training_losses(m.diffloss.net, target, t, z, noise)["loss"]
    official = (rows * w).sum() / w.sum()  # MAR: the head on every row, the loss times the mask
    torch.testing.assert_close(loss, official)
    # forward runs the head on the masked rows only: the same gradient as the official all-rows form
    params = [m.diffloss.net.final_layer.linear.weight, m.encoder_blocks[0].attn.qkv.weight]
    grads_official = torch.autograd.grad(official, params)
    grads = torch.autograd.grad(loss, params)
    for ours, theirs in zip(grads, grads_official):
        assert theirs.abs().sum() > 0
        torch.testing.assert_close(ours, theirs)


def test_label_drop_uses_fake_latent():
    m = small(label_drop_prob=1.0).train()
    x, mask = torch.randn(2, 16, 16), torch.zeros(2, 16)
    mask[:, :3] = 1
    for mod in m.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    for blk in m.encoder_blocks:
        blk.attn.attn_drop = 0.0
    dropped = m.forward_mae_encoder(x, mask, m.class_emb(torch.tensor([1, 2])))
    null = m.eval().forward_mae_encoder(x, mask, m.fake_latent.expand(2, -1))
    torch.testing.assert_close(dropped, null)


def test_vb_term_trains_only_the_variance_channels():
    """The vb term sees eps detached: its gradient on the eps rows of the final layer is zero."""
    m = randomize_(small())
    d = m.diffloss.train_diffusion
    x0, c = torch.randn(6, 16), torch.randn(6, 64)
    out = d.training_losses(m.diffloss.net, x0, torch.tensor([0, 1, 5, 100, 500, 998]), c, torch.randn(6, 16))
    out["vb"].sum().backward()
    g = m.diffloss.net.final_layer.linear.weight.grad  # (32, W): rows 0..15 eps, 16..31 variance
    assert g[:16].abs().sum() == 0 and g[16:].abs().sum() > 0


def test_load_errors_are_clear_and_name_keys(tmp_path):
    m = small()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        mar.load_mar(str(tmp_path / "nope.pth"), m)
    (tmp_path / "corrupt.pth").write_bytes(b"PK\x03\x04 definitely not a checkpoint")
    with pytest.raises(RuntimeError, match="could not read checkpoint"):
        mar.load_mar(str(tmp_path / "corrupt.pth"), m)
    torch.save({"weights": {}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a MAR checkpoint"):
        mar.load_mar(str(tmp_path / "other.pth"), m)
    # a checkpoint of another configuration: the error names the mis-shaped and unexpected keys
    big = small(encoder_depth=3)
    torch.save({"model": big.state_dict()}, tmp_path / "big.pth")
    with pytest.raises(ValueError, match=r"encoder_blocks\.2\.norm1\.weight"):
        mar.load_mar(str(tmp_path / "big.pth"), m)
    wide = small(diffloss_w=64)
    torch.save({"model_ema": wide.state_dict()}, tmp_path / "wide.pth")
    with pytest.raises(ValueError, match=r"mis-shaped.*diffloss\.net"):
        mar.load_mar(str(tmp_path / "wide.pth"), m)
    with pytest.raises(ValueError, match="not a KL autoencoder"):
        vae.load_vae(str(tmp_path / "wide.pth"))


def test_atomic_save_keeps_the_old_file_on_failure(tmp_path):
    path = str(tmp_path / "ck.pth")
    common.save_checkpoint(path, {"step": 1})
    with pytest.raises(Exception):
        common.save_checkpoint(path, {"step": 2, "bad": lambda: 0})  # not picklable: the save fails midway
    assert mar.read_checkpoint(path) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pth"]  # no temporary file left behind


def test_update_ema():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    before = a.weight.detach().clone()
    common.update_ema(a, b, 0.9)
    torch.testing.assert_close(a.weight, 0.9 * before + 0.1 * b.weight.detach())


def test_respacing():
    assert gaussian_diffusion.space_timesteps(1000, "10") == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    assert gaussian_diffusion.space_timesteps(1000, "1") == [999]  # deliberate: one step from pure noise
    assert len(gaussian_diffusion.space_timesteps(1000, "100")) == 100
    # IDDPM accumulates the fractional index (cur += 999/20): float error puts step 10 at 499.4999..., kept as 499;
    # round(stride * j) would keep 500. The official code keeps 499.
    assert gaussian_diffusion.space_timesteps(1000, "21")[9:12] == [450, 499, 549]
    assert gaussian_diffusion.space_timesteps(1000, "23")[11] == round(sum([999 / 22] * 11))  # the accumulated sum, not 11 * stride
    with pytest.raises(ValueError):
        gaussian_diffusion.space_timesteps(1000, "2000")


def test_official_training_checkpoint_with_args_namespace_loads(tmp_path):
    """Official MAR training pickles `args` as an argparse.Namespace: weights_only loading must still read it; any
    other pickled object is refused with a message that says so (not "incomplete file")."""
    import argparse
    model = mar.mar_tiny(img_size=32)
    torch.save({"model": model.state_dict(), "model_ema": model.state_dict(), "epoch": 3,
                "args": argparse.Namespace(model="mar_tiny", lr=1e-4)}, tmp_path / "official.pth")
    mar.load_mar(str(tmp_path / "official.pth"), mar.mar_tiny(img_size=32))
    torch.save({"model": model.state_dict(), "thing": Unsafe()}, tmp_path / "unsafe.pth")
    with pytest.raises(RuntimeError, match="weights_only loading refuses"):
        mar.read_checkpoint(str(tmp_path / "unsafe.pth"))
    (tmp_path / "cut.pth").write_bytes((tmp_path / "official.pth").read_bytes()[:5000])
    with pytest.raises(RuntimeError, match="is the file complete"):
        mar.read_checkpoint(str(tmp_path / "cut.pth"))


class Unsafe:  # a class outside torch's weights_only allow-list
    pass
