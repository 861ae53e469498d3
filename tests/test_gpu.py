"""The CUDA path: every stage's main() for a few steps on a GPU in bf16, at toy and mar_tiny sizes, then sample.py
and evaluate.py. Skipped (with the reason) without CUDA; run it on a GPU box before a long run:

    python -m pytest -q tests/test_gpu.py

A CPU run cannot see a CPU draw from a CUDA generator, a tensor left on the wrong device, or a bf16-only failure:
these tests are the only place they show before a multi-day job does.
"""
import json

import numpy as np
import pytest
import torch

import distill_gsim
import evaluate
import mar
import rl_refine
import sample
import train_mar
from test_imagenet_path import SIZE, world  # noqa: F401  (the class-folder / VAE / MAR fixture)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the GPU path needs a GPU")
GPU = ["--device", "cuda", "--precision", "bf16"]


def test_toy_stages_on_cuda(tmp_path, toy_vae_file):
    clf = str(tmp_path / "clf.pt")
    t = str(tmp_path / "teacher")
    train_mar.main(["--preset", "toy", "--out-dir", t, "--max-steps", "3", "--eval-images", "20",
                    "--eval-num-iter", "2", "--classifier", clf, "--toy-vae", toy_vae_file] + GPU)
    s = str(tmp_path / "student")
    distill_gsim.main(["--preset", "toy", "--teacher", f"{t}/checkpoint-last.pth", "--out-dir", s, "--max-steps", "3",
                       "--eval-images", "20", "--global-batch-size", "8", "--classifier", clf] + GPU)
    assert json.load(open(f"{s}/eval.json"))["speedup"] > 0
    r = str(tmp_path / "rl")
    rl_refine.main(["--preset", "toy", "--student", f"{s}/checkpoint-last.pth", "--out-dir", r, "--max-steps", "2",
                    "--eval-every", "2", "--eval-images", "20", "--global-batch-size", "4", "--classifier", clf] + GPU)
    for precision in ("bf16", "fp16"):
        sample.main(["--preset", "toy", "--ckpt", f"{r}/checkpoint-last.pth", "--one-step", "--num-images", "20",
                     "--num-iter", "4", "--device", "cuda", "--precision", precision, "--out-dir", str(tmp_path / precision)])
        out = evaluate.main(["--toy", "--samples", str(tmp_path / precision / "samples.npz"), "--classifier", clf])
        assert np.isfinite(out["toy_fid"])


def test_imagenet_path_stages_on_cuda(world, pickscore_dirs, tmp_path):  # noqa: F811
    vae_file, imgs = str(world / "kl16.ckpt"), str(world / "train")
    common = SIZE + ["--global-batch-size", "4", "--max-steps", "2", "--num-workers", "1"] + GPU
    train_mar.main(common + ["--data-path", imgs, "--vae", vae_file, "--out-dir", str(tmp_path / "t")])
    distill_gsim.main(common + ["--teacher", str(world / "mar.pth"), "--data-path", imgs, "--vae", vae_file,
                                "--out-dir", str(tmp_path / "s"), "--grad-checkpointing"])
    rl_refine.main(SIZE + GPU + ["--student", str(tmp_path / "s" / "checkpoint-last.pth"), "--vae", vae_file,
                                 "--reward", "pickscore", "--pickscore-model", pickscore_dirs[0],
                                 "--pickscore-processor", pickscore_dirs[1], "--global-batch-size", "2",
                                 "--max-steps", "2", "--num-iter", "2", "--eval-every", "2", "--eval-images", "4",
                                 "--out-dir", str(tmp_path / "r")])
    sample.main(SIZE + ["--ckpt", str(tmp_path / "r" / "checkpoint-last.pth"), "--vae", vae_file, "--one-step",
                        "--num-images", "10", "--class-num", "2", "--batch-size", "4", "--num-iter", "2",
                        "--device", "cuda", "--out-dir", str(tmp_path / "smp")])
    out = evaluate.main(["--samples", str(tmp_path / "smp" / "samples.npz"), "--ref-stats", str(world / "ref.npz"),
                         "--inception-weights", str(world / "inception.pth"), "--device", "cuda"])
    assert np.isfinite(out["fid"]) and np.isfinite(out["inception_score"])


def test_truncated_gaussian_mask_ratio_draws_on_a_cuda_generator():
    gen = torch.Generator("cuda").manual_seed(0)
    ratios = [mar.mar_tiny(img_size=64).num_masked(generator=gen) for _ in range(100)]
    assert all(11 <= r <= 16 for r in ratios)  # ceil(16 x [0.7, 1])
    model = mar.mar_tiny(img_size=64).cuda()
    loss = model(torch.randn(2, 16, 4, 4, device="cuda"), torch.tensor([1, 2], device="cuda"), generator=gen)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("one_step", [True, False])
def test_an_ar_step_never_waits_for_the_host(one_step):
    """The sampler's loop is shape-static: no boolean indexing, no .item(), no host-to-device table copy. CUDA's sync
    debug mode raises on any synchronising call inside it (the generators' orders are drawn before it)."""
    model = mar.mar_tiny(img_size=64).cuda().eval()
    labels = torch.tensor([1, 2], device="cuda")
    gens = [torch.Generator("cuda").manual_seed(i) for i in range(2)]
    kw = dict(head=mar.HeadSampler(one_step=True)) if one_step else dict(cfg=2.0, head=mar.HeadSampler(steps=3))
    with torch.no_grad():
        model.sample_tokens(2, num_iter=4, labels=labels, generator=gens, **kw)  # warm-up: tables reach the GPU
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            model.sample_tokens(2, num_iter=4, labels=labels, generator=gens, **kw)
        finally:
            torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("stage", ["sample_student", "gsim_ckpt"])
def test_dry_run_against_the_cuda_allocator(stage):
    """The dry run's peak (fake tensors) against torch.cuda.max_memory_allocated on the same step at MAR-B: they
    must agree within what the dry run leaves out (autocast's weight copies, allocator rounding). Prints both."""
    import bench
    opts = dict(student=True, num_iter=16) if stage == "sample_student" else dict(ckpt=True)
    dry = bench.dry_stage(stage, "mar_base", **opts)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    with torch.device("cuda"):
        torch.manual_seed(0)
        run, _, optimizers, _, _ = bench.STAGES[stage]("mar_base", opts)
        bench._steady_state(optimizers)  # as the dry run: a step after the first, optimizer states held
        base = torch.cuda.memory_allocated()
        run()
    real = torch.cuda.max_memory_allocated() / 2 ** 30
    print(f"{stage}: dry run {dry['peak_gib']:.2f} GiB, CUDA allocator {real:.2f} GiB (parameters before the step "
          f"{base / 2 ** 30:.2f} GiB)")
    assert abs(real - dry["peak_gib"]) < 0.15 * dry["peak_gib"] + 1.0
