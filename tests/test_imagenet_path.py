"""The ImageNet path as its users type it, at a size a CPU runs in a minute: a class-folder dataset of JPEGs, a KL
VAE file, an official-format MAR checkpoint (with the `args` Namespace the official training pickles), PickScore
from local transformers directories, and every stage through its command line under torchrun with 2 gloo
processes: data.py cache, train_mar.py (images and cache), distill_gsim.py, rl_refine.py, sample.py, evaluate.py.
The same --model / --img-size flags as for MAR-B at 256, here mar_tiny at 64 (16 tokens of a stride-16 VAE)."""
import argparse
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import distill_gsim
import evaluate
import mar
import train_mar
import vae
from conftest import randomize_
from test_train_mar import torchrun

SIZE = ["--model", "mar_tiny", "--img-size", "64"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Images (2 classes x 4 JPEGs of assorted sizes), the VAE file, the MAR checkpoint, Inception weights and an
    ADM-style reference batch, all written here."""
    d = tmp_path_factory.mktemp("imagenet_path")
    rng = np.random.default_rng(0)
    for c, name in enumerate(["n01440764", "n01443537"]):
        (d / "train" / name).mkdir(parents=True)
        for i, (w, h) in enumerate([(80, 64), (64, 96), (150, 120), (64, 64)]):
            yy, xx = np.mgrid[0:h, 0:w]
            img = np.stack([np.sin(xx / (5 + c + i)), np.cos(yy / 7), (xx + yy) / (w + h)], -1) * 100 + 120
            img = (img + rng.normal(0, 10, img.shape)).clip(0, 255).astype(np.uint8)
            Image.fromarray(img).save(d / "train" / name / f"img_{i}.JPEG", quality=90)
    # A stride-16 KL autoencoder (five levels, as KL-16) of width 32, plus a training-only key as LDM files carry.
    torch.manual_seed(0)
    ae = randomize_(vae.AutoencoderKL(ch=32, ch_mult=(1, 1, 1, 1, 1), num_res_blocks=1, attn_resolutions=(),
                                      resolution=64), std=0.01)
    torch.save({"model": {**ae.state_dict(), "loss.logvar": torch.zeros(())}}, d / "kl16.ckpt")
    # The MAR teacher in the official training format: model, model_ema, and args as an argparse.Namespace.
    torch.manual_seed(1)
    m = randomize_(mar.mar_tiny(img_size=64), std=0.02)
    torch.save({"model": m.state_dict(), "model_ema": m.state_dict(), "epoch": 399,
                "args": argparse.Namespace(model="mar_tiny", img_size=64)}, d / "mar.pth")
    torch.manual_seed(2)
    torch.save(randomize_(evaluate.FIDInception(), std=0.01).state_dict(), d / "inception.pth")
    ref = np.stack([np.array(Image.open(p).convert("RGB").resize((64, 64)))
                    for p in sorted((d / "train").rglob("*.JPEG"))])
    np.savez(d / "ref.npz", arr_0=ref)
    return d


def run(script, args):
    r = torchrun(script, args)
    assert r.returncode == 0, f"{script} failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return r.stdout + r.stderr


def test_every_stage_through_torchrun(world, pickscore_dirs, tmp_path):
    d, vae_file = world, str(world / "kl16.ckpt")
    imgs = str(d / "train")
    common = SIZE + ["--global-batch-size", "4", "--max-steps", "2", "--log-every", "1", "--num-workers", "1"]
    out = run("data.py", ["cache", "--data-path", imgs, "--vae", vae_file, "--out-dir", str(tmp_path / "cache"),
                          "--img-size", "64", "--batch-size", "2"])
    assert len(list((tmp_path / "cache").rglob("*.npz"))) == 8
    out = run("train_mar.py", common + ["--data-path", imgs, "--vae", vae_file, "--out-dir", str(tmp_path / "t_img")])
    assert "ranks agree: all 2 processes" in out
    out = run("train_mar.py", common + ["--cached-path", str(tmp_path / "cache"), "--out-dir", str(tmp_path / "t")])
    assert "ranks agree: all 2 processes" in out
    out = run("distill_gsim.py", common + ["--teacher", str(d / "mar.pth"), "--data-path", imgs, "--vae", vae_file,
                                           "--out-dir", str(tmp_path / "s"), "--grad-checkpointing"])
    assert "ranks agree: all 2 processes" in out and "head only" in out
    student = str(tmp_path / "s" / "checkpoint-last.pth")
    out = run("rl_refine.py", SIZE + ["--student", student, "--vae", vae_file, "--reward", "pickscore",
                                      "--pickscore-model", pickscore_dirs[0], "--pickscore-processor",
                                      pickscore_dirs[1], "--global-batch-size", "2", "--max-steps", "2",
                                      "--num-iter", "2", "--eval-every", "2", "--eval-images", "4",
                                      "--out-dir", str(tmp_path / "r")])
    assert "ranks agree: all 2 processes" in out
    report = json.load(open(tmp_path / "r" / "eval.json"))
    assert report["best"] is not None and report["start"]["drift"] == 0.0 and report["last"]["drift"] >= 0
    run("sample.py", SIZE + ["--ckpt", str(tmp_path / "r" / "checkpoint-last.pth"), "--vae", vae_file, "--one-step",
                             "--num-images", "10", "--class-num", "2", "--batch-size", "2", "--num-iter", "2",
                             "--out-dir", str(tmp_path / "smp")])
    with np.load(tmp_path / "smp" / "samples.npz") as f:
        assert f["arr_0"].shape == (10, 64, 64, 3) and f["arr_0"].dtype == np.uint8
    res = {}
    for name, samples in (("npz", tmp_path / "smp" / "samples.npz"), ("png", tmp_path / "smp" / "images")):
        res[name] = evaluate.main(["--samples", str(samples), "--ref-stats", str(d / "ref.npz"),
                                   "--inception-weights", str(d / "inception.pth"), "--device", "cpu"])
    assert np.isfinite(res["npz"]["fid"]) and res["npz"]["fid"] == pytest.approx(res["png"]["fid"], rel=1e-6)


def test_resume_is_exact_on_the_image_path(world, tmp_path):
    """Kill-and-resume equals the uninterrupted run with DataLoader workers drawing nothing: the flips come from the
    seeded epoch generator (train_mar from JPEGs, distill_gsim from JPEGs)."""
    d, vae_file = world, str(world / "kl16.ckpt")
    base = SIZE + ["--data-path", str(d / "train"), "--vae", vae_file, "--global-batch-size", "4",
                   "--num-workers", "2", "--log-every", "1", "--save-every", "2"]
    for mod, extra in ((train_mar, ["--eval-images", "0"]), (distill_gsim, ["--teacher", str(d / "mar.pth")])):
        a, b = str(tmp_path / mod.__name__ / "a"), str(tmp_path / mod.__name__ / "b")
        mod.main(base + extra + ["--out-dir", a, "--max-steps", "4"])
        mod.main(base + extra + ["--out-dir", b, "--max-steps", "2"])
        mod.main(base + extra + ["--out-dir", b, "--max-steps", "4", "--resume"])
        ca, cb = (mar.read_checkpoint(os.path.join(x, "checkpoint-last.pth")) for x in (a, b))
        for part in ("model", "model_ema"):
            assert all(torch.equal(ca[part][k], cb[part][k]) for k in ca[part]), (mod.__name__, part)


def test_vae_architecture_is_read_off_the_file(world):
    ae = vae.load_vae(str(world / "kl16.ckpt"))
    assert ae.encoder.conv_in.out_channels == 32 and len(ae.encoder.down) == 5
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    assert ae.encode(x).mean.shape == (1, 16, 4, 4)
    # KL-16's own layout (from the reference key list) gives the constructor defaults
    with torch.device("meta"):  # shapes only
        cfg = vae.config_from_state_dict(vae.AutoencoderKL().state_dict())
    assert cfg == dict(embed_dim=16, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,),
                       resolution=256, z_channels=16)


def test_kl_constructor_ties_z_channels_to_embed_dim():
    ae = vae.AutoencoderKL(embed_dim=8, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), resolution=16)
    assert ae.encoder.conv_out.out_channels == 16 and ae.decoder.conv_in.in_channels == 8  # 2 x 8 moments; z = 8
    assert ae.decode(ae.encode(torch.zeros(1, 3, 16, 16)).sample()).shape == (1, 3, 16, 16)


def test_cache_uses_workers_resumes_and_names_a_bad_image(world, tmp_path, capsys):
    """data.py cache with DataLoader workers: a second run skips what is cached and rewrites only what is missing (the
    same moments); an unreadable image stops the run naming it (what was cached stays) or, with --bad-images skip, is
    reported and left out."""
    import shutil
    import common
    import data
    imgs, out = tmp_path / "train", tmp_path / "cache"
    shutil.copytree(world / "train", imgs)
    base = ["cache", "--data-path", str(imgs), "--vae", str(world / "kl16.ckpt"), "--out-dir", str(out),
            "--img-size", "64", "--batch-size", "3", "--num-workers", "2", "--device", "cpu"]
    data.main(base)
    files = sorted(out.rglob("*.npz"))
    assert len(files) == 8
    first = {f: np.load(f)["moments"] for f in files}
    files[3].unlink()
    capsys.readouterr()
    data.main(base)
    log = capsys.readouterr().out
    assert "7 of its 8 images are cached already" in log and "encoded 1 images" in log
    assert sorted(out.rglob("*.npz")) == files
    assert all(np.allclose(np.load(f)["moments"], m, atol=1e-5) for f, m in first.items())  # batch-size rounding
    data.main(base)
    assert "encoded 0 images" in capsys.readouterr().out  # nothing left to encode
    # a truncated JPEG: named, and nothing cached is lost
    bad = imgs / "n01440764" / "img_9.JPEG"
    bad.write_bytes((imgs / "n01440764" / "img_0.JPEG").read_bytes()[:200])
    with pytest.raises(common.UsageError, match="img_9.JPEG"):
        data.main(base)
    assert sorted(out.rglob("*.npz")) == files
    data.main(base + ["--bad-images", "skip"])
    assert "skipped:" in capsys.readouterr().out and sorted(out.rglob("*.npz")) == files
