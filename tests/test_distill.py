"""distill_gsim.py end to end on the toy: the step keeps the teacher and aux frozen, the student checkpoint is a MAR,
resume is exact, and a 2-process gloo run keeps the ranks identical."""
import copy
import json
import math
import os
from types import SimpleNamespace

import pytest
import torch

import data
import distill_gsim
from gaussian_diffusion import GaussianDiffusion
import mar
from conftest import randomize_
from test_train_mar import torchrun

FAST = ["--preset", "toy", "--global-batch-size", "8", "--eval-images", "0", "--log-every", "1", "--save-every", "2"]


def test_only_the_student_head_moves(toy_ckpt, tmp_path):
    out = str(tmp_path / "s")
    distill_gsim.main(FAST + ["--teacher", toy_ckpt, "--out-dir", out, "--max-steps", "3"])
    ck = mar.read_checkpoint(os.path.join(out, "checkpoint-last.pth"))
    t = mar.read_checkpoint(toy_ckpt)["model_ema"]
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
    x = student.sample_tokens(2, num_iter=2, labels=torch.tensor([1, 2]), head=mar.HeadSampler(one_step=True))
    assert x.shape == (2, 16, 4, 4) and torch.isfinite(x).all()  # toy VAE latents
    ck_vae, t_vae = ck["toy_vae"], mar.read_checkpoint(toy_ckpt)["toy_vae"]  # the teacher's toy VAE, passed on
    assert ck_vae.keys() == t_vae.keys() and all(torch.equal(ck_vae[k], t_vae[k]) for k in t_vae)


def test_resume_is_exact(toy_ckpt, tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    distill_gsim.main(FAST + ["--teacher", toy_ckpt, "--out-dir", a, "--max-steps", "4"])
    distill_gsim.main(FAST + ["--teacher", toy_ckpt, "--out-dir", b, "--max-steps", "2"])
    distill_gsim.main(FAST + ["--teacher", toy_ckpt, "--out-dir", b, "--max-steps", "4", "--resume"])
    ca, cb = (mar.read_checkpoint(os.path.join(d, "checkpoint-last.pth")) for d in (a, b))
    for part in ("model", "model_ema", "aux"):
        assert all(torch.equal(ca[part][k], cb[part][k]) for k in ca[part]), part


def test_two_process_gloo_run_keeps_ranks_identical(toy_ckpt, tmp_path):
    r = torchrun("distill_gsim.py", FAST + ["--teacher", toy_ckpt, "--out-dir", str(tmp_path / "ddp"), "--max-steps", "2"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "ranks agree: all 2 processes" in r.stdout + r.stderr


def test_two_process_rl_run_keeps_ranks_identical(toy_student_ckpt, toy_classifier_file, tmp_path):
    r = torchrun("rl_refine.py", ["--preset", "toy", "--student", toy_student_ckpt, "--out-dir", str(tmp_path / "rl"),
                                  "--max-steps", "2", "--global-batch-size", "4", "--eval-every", "0",
                                  "--classifier", toy_classifier_file])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "ranks agree: all 2 processes" in r.stdout + r.stderr


def test_train_transformer_also_moves_the_transformer(toy_ckpt, tmp_path):
    out = str(tmp_path / "tt")
    distill_gsim.main(FAST + ["--teacher", toy_ckpt, "--out-dir", out, "--max-steps", "2", "--train-transformer"])
    ck, t = mar.read_checkpoint(os.path.join(out, "checkpoint-last.pth")), mar.read_checkpoint(toy_ckpt)["model_ema"]
    assert not torch.equal(ck["model"]["encoder_blocks.0.attn.qkv.weight"], t["encoder_blocks.0.attn.qkv.weight"])
    assert not torch.equal(ck["model"]["diffloss.net.final_layer.linear.weight"],
                           t["diffloss.net.final_layer.linear.weight"])


def test_head_only_checkpoint_is_the_teacher_transformer_plus_the_student_head(toy_ckpt, tmp_path):
    """Head-only keeps one transformer: model and model_ema carry the teacher's transformer and the (EMA) head."""
    out = str(tmp_path / "h")
    distill_gsim.main(FAST + ["--teacher", toy_ckpt, "--out-dir", out, "--max-steps", "2", "--save-every", "1"])
    ck, t = mar.read_checkpoint(os.path.join(out, "checkpoint-last.pth")), mar.read_checkpoint(toy_ckpt)["model_ema"]
    for part in ("model", "model_ema"):
        assert set(ck[part]) == set(t)
        assert all(torch.equal(ck[part][k], t[k]) for k in t if not k.startswith("diffloss.net."))
    assert not torch.equal(ck["model_ema"]["diffloss.net.final_layer.linear.weight"],
                           ck["model"]["diffloss.net.final_layer.linear.weight"])  # EMA 0.99 lags the head


def test_linear_teacher_cfg_schedule_follows_the_contexts_mask_ratio(toy_ckpt, tmp_path):
    """--teacher-cfg-schedule linear: the target's scale is MAR's sampler ramp at the batch's still-masked count,
    1 for an all-masked context and cfg for a fully visible one; it reaches the loss (same student as the constant
    schedule at that scale, bit for bit, and a different one from the constant schedule at cfg)."""
    assert mar.cfg_scale_at(3.0, 16, 16, "linear") == 1.0  # the scale gsim_step asks for, by masked count
    assert mar.cfg_scale_at(3.0, 16, 0, "linear") == 3.0
    assert mar.cfg_scale_at(3.0, 16, 8, "linear") == 2.0
    assert mar.cfg_scale_at(3.0, 16, 8, "constant") == 3.0

    def student(name, ratio, cfg, schedule):
        out = str(tmp_path / name)
        distill_gsim.main(FAST + ["--teacher", toy_ckpt, "--out-dir", out, "--max-steps", "2", "--mask-ratio", ratio,
                                  "--teacher-cfg", cfg, "--teacher-cfg-schedule", schedule])
        ck = mar.read_checkpoint(os.path.join(out, "checkpoint-last.pth"))
        return ck["model"]["diffloss.net.final_layer.linear.weight"]

    half = student("lin_half", "0.5", "3.0", "linear")  # 8 of 16 masked: scale 2
    assert torch.equal(half, student("const_2", "0.5", "2.0", "constant"))
    assert not torch.equal(half, student("const_3", "0.5", "3.0", "constant"))
    assert torch.equal(student("lin_all", "1.0", "3.0", "linear"), student("const_1", "1.0", "1.0", "constant"))


def test_bad_flags_are_clear_errors(toy_ckpt, tmp_path, capsys):
    for argv, msg in ((["--data-path", str(tmp_path)], "--data-path needs --vae"),
                      (["--preset", "toy", "--aux-steps", "0"], "argument --aux-steps: 0 is out of range")):
        with pytest.raises(SystemExit):
            distill_gsim.get_args(argv + ["--teacher", toy_ckpt, "--out-dir", str(tmp_path / "x")])
        assert msg in capsys.readouterr().err


def cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)  # (N,)


DIFF = GaussianDiffusion(1000)


def test_time_weight_power_reaches_the_loss():
    """--time-weight-power p weights each token's eps-form loss by sigma^(p - 1) (w(t) = sigma_t^p in score units):
    with two tokens at different sigma, the loss at p equals the per-token losses at p = 1 weighted that way."""
    torch.manual_seed(0)
    head = randomize_(mar.mar_tiny().diffloss.net, std=0.05).eval().requires_grad_(False)
    aux = randomize_(copy.deepcopy(head), std=0.05, seed=1)
    x_t, c, c_null = torch.randn(2, 16), torch.randn(2, 64), torch.randn(2, 64)
    t, eps = torch.tensor([50, 700]), torch.randn(2, 16)
    sigma = (1 - DIFF.alphas_cumprod[t]).sqrt().float()                                  # (0.08, 0.92)

    def loss(p, i):
        fn = distill_gsim.GeneratorLoss(DIFF, r=1e-5, path_weight=1.0, time_weight_power=p)
        return fn.at(x_t[i], t[i], eps[i], lambda x, tt: mar.guided_eps(head, x, tt, c[i], c_null[i], 1.5)[:, :16],
                     lambda x, tt: aux(x, tt, c[i])[:, :16])[0]

    both, per_token = slice(0, 2), [loss(1.0, slice(i, i + 1)) for i in range(2)]
    for p in (0.0, 2.0):
        want = (per_token[0] * sigma[0] ** (p - 1) + per_token[1] * sigma[1] ** (p - 1)) / 2
        torch.testing.assert_close(loss(p, both), want)
    assert not torch.allclose(loss(0.0, both), loss(1.0, both))


def test_gsim_delta_direction_survives_bf16_autocast():
    """Near convergence |Delta| is small and the pseudo-Huber gradient keeps only Delta / |Delta|. Under bf16 autocast
    the generator loss must still form Delta from fp32 head outputs: per-token cosine >= 0.999 with the fp32 Delta,
    where heads run in bf16 lose it (the check below that the naive way fails shows the test can fail)."""
    torch.manual_seed(0)
    head = randomize_(mar.mar_tiny().diffloss.net, std=0.05).eval().requires_grad_(False)  # (x (N,16), t, c (N,64))
    aux = randomize_(copy.deepcopy(head), std=5e-4, seed=1)  # a nearly converged student: aux ~ guided teacher
    N = 512
    x_t, c, c_null = torch.randn(N, 16), torch.randn(N, 64), torch.randn(N, 64)
    t = torch.randint(20, 981, (N,))
    eps = torch.randn(N, 16)
    fn = distill_gsim.GeneratorLoss(DIFF)  # cfg 1 below; aux ~ teacher: Delta is the residual
    teacher_eps = lambda x, tt: mar.guided_eps(head, x, tt, c, c_null, 1.0)[:, :16]
    aux_eps = lambda x, tt: aux(x, tt, c)[:, :16]
    _, p32, a32 = fn.at(x_t, t, eps, teacher_eps, aux_eps)
    delta32 = p32 - a32
    assert 0 < delta32.norm(dim=-1).median() < 0.1  # small, as near convergence
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, p, a = fn.at(x_t, t, eps, teacher_eps, aux_eps)
        naive = mar.guided_eps(head, x_t, t, c, c_null, 1.0)[:, :16] - aux(x_t, t, c)[:, :16]
    assert p.dtype == a.dtype == loss.dtype == torch.float32
    assert cosine(p - a, delta32).min() >= 0.999
    assert naive.dtype == torch.bfloat16 and cosine(naive, delta32).min() < 0.999
