"""distill_gsim.py end to end on the toy: the step keeps the teacher and aux frozen, the student checkpoint is a MAR,
resume is exact, and a 2-process gloo run keeps the ranks identical."""
import json
import math
import os

import torch

import data
import distill_gsim
import mar
from test_train_mar import torchrun

FAST = ["--preset", "toy", "--global-batch-size", "8", "--eval-images", "0", "--log-every", "1", "--save-every", "2"]


def test_only_the_student_head_moves(toy_ckpt, tmp_path):
    out = str(tmp_path / "s")
    distill_gsim.main(FAST + ["--teacher", toy_ckpt, "--out-dir", out, "--max-steps", "3"])
    ck = mar.load_checkpoint(os.path.join(out, "checkpoint-last.pth"))
    t = mar.load_checkpoint(toy_ckpt)["model_ema"]
    head = [k for k in t if k.startswith("diffloss.net.")]
    assert any(not torch.equal(ck["model"][k], t[k]) for k in head)                # the one-step head was trained
    assert all(torch.equal(ck["model"][k], t[k]) for k in t if k not in head)      # the transformer was not
    assert any(not torch.equal(ck["aux"][k[len("diffloss.net."):]], t[k]) for k in head)  # the aux was trained
    rows = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:  # generator loss, aux loss and |y| statistics, finite, every logged step
        assert all(math.isfinite(r[k]) for k in ("loss_g", "loss_aux", "y_mean", "y_max", "grad_norm_g")), r
        assert 0 < r["y_mean"] <= r["y_max"]
    student = mar.load_mar(os.path.join(out, "checkpoint-last.pth"), mar.MAR(**data.TOY_MODEL))  # a plain MAR
    x = student.sample_tokens(2, num_iter=2, labels=torch.tensor([1, 2]), one_step=True)
    assert x.shape == (2, 1, 16, 16) and torch.isfinite(x).all()


def test_resume_is_exact(toy_ckpt, tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    distill_gsim.main(FAST + ["--teacher", toy_ckpt, "--out-dir", a, "--max-steps", "4"])
    distill_gsim.main(FAST + ["--teacher", toy_ckpt, "--out-dir", b, "--max-steps", "2"])
    distill_gsim.main(FAST + ["--teacher", toy_ckpt, "--out-dir", b, "--max-steps", "4", "--resume"])
    ca, cb = (mar.load_checkpoint(os.path.join(d, "checkpoint-last.pth")) for d in (a, b))
    for part in ("model", "model_ema", "aux"):
        assert all(torch.equal(ca[part][k], cb[part][k]) for k in ca[part]), part


def test_two_process_gloo_run_keeps_ranks_identical(toy_ckpt, tmp_path):
    r = torchrun("distill_gsim.py", FAST + ["--teacher", toy_ckpt, "--out-dir", str(tmp_path / "ddp"), "--max-steps", "2"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "ranks agree: all 2 processes" in r.stdout + r.stderr


def test_two_process_rl_run_keeps_ranks_identical(toy_ckpt, tmp_path):
    r = torchrun("rl_refine.py", ["--preset", "toy", "--student", toy_ckpt, "--out-dir", str(tmp_path / "rl"),
                                  "--max-steps", "2", "--global-batch-size", "4", "--eval-every", "0",
                                  "--classifier", str(tmp_path / "clf.pt")])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "ranks agree: all 2 processes" in r.stdout + r.stderr


def test_train_transformer_also_moves_the_transformer(toy_ckpt, tmp_path):
    out = str(tmp_path / "tt")
    distill_gsim.main(FAST + ["--teacher", toy_ckpt, "--out-dir", out, "--max-steps", "2", "--train-transformer"])
    ck, t = mar.load_checkpoint(os.path.join(out, "checkpoint-last.pth")), mar.load_checkpoint(toy_ckpt)["model_ema"]
    assert not torch.equal(ck["model"]["encoder_blocks.0.attn.qkv.weight"], t["encoder_blocks.0.attn.qkv.weight"])
    assert not torch.equal(ck["model"]["diffloss.net.final_layer.linear.weight"],
                           t["diffloss.net.final_layer.linear.weight"])
