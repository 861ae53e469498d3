"""bench.py --dry-run and --launch-counts: the paper's sizes on fake tensors (no storage, no GPU).

The dry run executes one real step of every stage through the function its script calls, so a fault that only a
real size shows (a graph kept while sampling, a step that does not fit) shows here in seconds. The counter itself
is checked against bytes counted by hand.
"""
import json

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import bench

MIB = 2 ** 20


def test_live_memory_counts_what_a_hand_count_gives():
    with FakeTensorMode():
        lin = torch.nn.Linear(1024, 512)                                        # 512 x 1025 fp32 = 2,099,200 bytes
        opt = bench._like_gpu(torch.optim.AdamW(lin.parameters()))
        meter = bench.LiveMemory([lin], [opt])
        with meter:
            a = torch.randn(256, 1024)                                          # 1 MiB
            b = a * 2                                                           # 1 MiB: 2 MiB of activations
            del a                                                               # freed: 1 MiB
            c = b.t()                                                           # a view: nothing
            assert meter.now["activations"] == MIB and meter.peak == 2 * MIB + 2_099_200
            del b, c
            lin(torch.randn(8, 1024)).sum().backward()
            opt.step()
    params = 512 * 1025 * 4
    assert meter.now["parameters"] == params and meter.now["gradients"] == params  # weight and bias gradients
    # AdamW: exp_avg and exp_avg_sq per parameter, plus a 4-byte step counter per parameter tensor
    assert meter.now["optimizer"] == 2 * params + 2 * 4
    assert meter.now["activations"] == 0                                        # every temporary freed


@pytest.fixture(scope="module")
def base_table(tmp_path_factory):
    """Every stage of MAR-B, at small K (the sizes per image are the paper's; K only sets the loop length)."""
    path = tmp_path_factory.mktemp("dry") / "dry.json"
    bench.main(["--dry-run", "--model", "mar_base", "--num-iter", "4", "--rl-num-iter", "2", "--json", str(path)])
    return json.load(open(path))


def test_dry_run_reports_every_stage(base_table):
    assert base_table["model"] == "mar_base"
    rows = {(r["stage"], r["num_iter"]) for r in base_table["stages"]}
    assert rows == {("train", None), ("train_ckpt", None), ("gsim", None), ("gsim_ckpt", None), ("rl", 2), ("sample_teacher", 4),
                    ("sample_student", 4), ("inception", None)}
    for r in base_table["stages"]:
        assert r["peak_gib"] >= r["parameters_gib"] + r["activations_gib"] > 0 and isinstance(r["fits_80gb"], bool)
    by = {r["stage"]: r for r in base_table["stages"]}
    # the README commands' per-GPU batches: 64 (MAR, GSIM), 2 (RL), 256 (sample.py), 50 (evaluate.py)
    assert [by[s]["per_gpu_batch"] for s in ("train", "gsim", "rl", "sample_student", "inception")] == [64, 64, 2, 256,
                                                                                                       50]
    # MAR-B's 207,924,768 fp32 parameters; GSIM adds the student head, its EMA and the aux head (3 x 37.7M, fp32)
    assert by["sample_student"]["parameters_gib"] == pytest.approx((207_924_768 * 4 + 66_456_019 * 4) / 2 ** 30,
                                                                   rel=1e-3)  # + the KL-16 decoder's 66.5M
    # checkpointing the heads is what makes GSIM small: the same step keeps a fraction of the activations
    assert by["gsim_ckpt"]["activations_gib"] < 0.5 * by["gsim"]["activations_gib"]


def test_sampling_keeps_no_graph_at_paper_size():
    """sample.py's step at MAR-B, 256 images: the peak is the same at K = 16 and K = 64 (a kept autograd graph would
    grow with every AR step), and the teacher's does not grow with its head steps."""
    k16 = bench.dry_stage("sample_student", "mar_base", student=True, num_iter=16)
    k64 = bench.dry_stage("sample_student", "mar_base", student=True, num_iter=64)
    assert k64["peak_gib"] == pytest.approx(k16["peak_gib"], abs=1e-3)
    s2 = bench.dry_stage("sample_teacher", "mar_base", student=False, num_iter=16, head_steps=2)
    s4 = bench.dry_stage("sample_teacher", "mar_base", student=False, num_iter=16, head_steps=4)
    assert s4["peak_gib"] - s2["peak_gib"] < 1 / 1024  # only the step's noise grows with S (kilobytes)


def test_gsim_at_mar_huge_fits_80gb_with_checkpointing():
    row = bench.dry_stage("gsim_ckpt", "mar_huge", ckpt=True)
    assert row["per_gpu_batch"] == 64 and row["fits_80gb"], row


def test_launch_counts_are_linear_and_the_teacher_launches_more():
    out = bench.launch_counts("mar_base", 2.9)  # raises if a fourth count breaks the linear model
    assert out["teacher_per_head_step"] > 0 and out["student_per_ar_step"] > out["teacher_per_head_step"]
    assert out["teacher"][256] > out["teacher"][64] > 100 * 64 * out["teacher_per_head_step"]
    assert all(r > 1 for r in out["ratio"].values())
