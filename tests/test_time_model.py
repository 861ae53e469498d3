"""bench.py's time model and its TF32 check: FLOPs counted on fake tensors against counts by hand, launches linear in
K and in the head steps, the fitted constants against the published times they were fitted on, and the TF32
emulation against known bit patterns.

The time model (bench.py's section) prices a step as FLOPs / (peak u) + launches x t_launch. Its FLOPs come from
`bench.WorkCount` on the very functions the scripts run; the counts by hand below use MAR's shapes: an encoder on the
64 buffer slots + the visible tokens, a decoder on 64 + 256 positions, the head on 4 rows per masked token (training)
or one row per token (sampling), ~2 FLOPs per weight and row forward and 4 backward.
"""
import math
import random

import pytest
import torch

import bench
import mar

B, L, BUF, D = 64, 256, 64, 768  # MAR-B at the README's 64 per GPU: tokens, buffer slots, width


def linear_weights(module):
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))


@pytest.fixture(scope="module")
def base():
    """MAR-B on the meta device (no memory): its matmul weights by part."""
    with torch.device("meta"):
        model = mar.mar_base()
    head = model.diffloss.net
    x_path = sum(linear_weights(b.mlp) for b in head.res_blocks) + linear_weights(head.input_proj) + \
        linear_weights(head.final_layer.linear)  # the head's layers on x_t's path (not its condition's)
    return dict(enc=linear_weights(model.encoder_blocks), dec=linear_weights(model.decoder_blocks),
                head=linear_weights(head), head_x_path=x_path, depth=len(model.encoder_blocks))


def transformer_forward(w, n_enc):
    """Forward FLOPs of one image's encoder (n_enc tokens) + decoder (BUF + L positions): 2 a weight and token in the
    blocks, decoder_embed and z_proj (on all L tokens), and attention's two batched products, 4 N^2 D a block."""
    n_dec = BUF + L
    linear = w["enc"] * n_enc + D * D * n_enc + w["dec"] * n_dec + 16 * D * L
    return 2 * linear + 4 * D * w["depth"] * (n_enc ** 2 + n_dec ** 2)


def total(work):
    return sum(work[p] for p in bench.PRECISIONS)


def test_training_step_flops_match_a_count_by_hand(base):
    """train_mar.py's step at mask ratio 1 (no visible token): 3 x the forward for the transformer (forward, and a
    backward of twice its FLOPs) and 6 x the head's weights on each of its 4 x 64 x 256 rows; all in bf16."""
    row = bench.dry_stage("train", "mar_base", mask_ratio=1.0, ckpt=False)
    flops = row["flops_per_step"]
    by_hand = B * 3 * transformer_forward(base, BUF) + 6 * base["head"] * 4 * B * L
    assert total(flops) == pytest.approx(by_hand, rel=0.01)
    assert flops["fp32"] == flops["tf32"] == 0  # everything under bf16 autocast (attention's CPU fp32 path counted bf16)
    # the README's average step (MAR's mean mask ratio 0.867): fewer head rows, more encoder tokens
    assert bench.mean_mask_ratio("train") == pytest.approx(0.8670, abs=1e-4)
    masked = math.ceil(L * bench.mean_mask_ratio("train"))
    avg = B * 3 * transformer_forward(base, BUF + L - masked) + 6 * base["head"] * 4 * B * masked
    assert total(row["work_average"]) == pytest.approx(avg, rel=0.01)
    seconds = row["seconds_per_step"]
    assert seconds[bench.A100] > seconds[bench.H100] > 0
    assert row["hours"][bench.A100] == pytest.approx(row["readme_steps"] * seconds[bench.A100] / 3600)
    assert row["readme_steps"] == 800 * (1_281_167 // 512)  # train_mar.py's 800 epochs at the README's batch 512


def test_mean_mask_ratio_is_the_mean_of_mars_draw():
    rng = random.Random(0)  # the training loops' host draw
    draws = [mar.truncnorm_mask_ratio(0.7, rng.random()) for _ in range(20_000)]
    assert sum(draws) / len(draws) == pytest.approx(bench.mean_mask_ratio("train"), abs=0.002)
    # GSIM: half of the batches MAR's draw, half U(0, 1] (distill_gsim.py's --uniform-mask-prob 0.5)
    assert bench.mean_mask_ratio("gsim") == pytest.approx(0.5 * 0.5 + 0.5 * 0.8670, abs=1e-4)


def test_gsim_runs_its_teacher_and_aux_heads_in_fp32(base):
    """GSIM's generator loss: the guided teacher (2 rows a token: CFG) and the aux (1 row) in fp32, forward (2 x the
    head's weights a row) and backward to x_t only (their parameters and conditions are frozen): 2 x the weights on
    x_t's path. With TF32 allowed those FLOPs run 8x faster on an A100, and the README command's hours drop."""
    row = bench.dry_stage("gsim", "mar_base", mask_ratio=1.0, ckpt=False)
    rows = 4 * B * L  # diffusion_batch_mul draws of every masked token
    assert row["flops_per_step"]["fp32"] == pytest.approx(2 * 3 * rows * (base["head"] + base["head_x_path"]), rel=0.01)
    for gpu in bench.PEAK:
        assert 0 < row["hours_tf32"][gpu] < row["hours"][gpu]
    assert row["hours"][bench.A100] > row["hours"][bench.H100]


def test_sampling_flops_are_forward_only_and_launches_linear_in_k(base):
    """sample.py's student batch: each AR step runs the encoder on the buffer + the tokens known so far and the
    decoder on every position, forward only; the head draws every token once whatever K (so it cancels between two
    K). Launches: the same operators every AR step, so exactly linear in K."""
    work = {K: bench._count("sample_student", "mar_base", dict(student=True, num_iter=K, batch=B), memory=False)[1]
            for K in (2, 3, 4)}
    assert work[4]["launches"] - work[3]["launches"] == work[3]["launches"] - work[2]["launches"] > 0

    def transformer(K):  # forward FLOPs of the K AR steps of one image
        masked, flops = L, 0
        for n_pred, _ in mar.mask_schedule(L, K):
            flops += transformer_forward(base, BUF + L - masked)
            masked -= n_pred
        return flops
    assert total(work[4]) - total(work[2]) == pytest.approx(B * (transformer(4) - transformer(2)), rel=0.01)


def test_teacher_work_is_exactly_linear_in_head_steps():
    """The teacher's reverse head steps all have the same shapes: w(S) is exactly linear in S, which is how the dry run
    prices 100 steps from 2 and 3 (bench.average_work)."""
    opts = dict(student=False, num_iter=2, head_steps=1)
    w = {S: bench._count("sample_teacher", "mar_base", {**opts, "head_steps": S}, memory=False)[1] for S in (1, 2, 3)}
    for key in ("bf16", "launches"):
        assert w[3][key] - w[2][key] == w[2][key] - w[1][key] > 0
    at_100 = bench.average_work("sample_teacher", "mar_base", {**opts, "head_steps": 1}, w[1])
    assert at_100["launches"] == w[1]["launches"] + 99 * (w[2]["launches"] - w[1]["launches"])


def test_the_fitted_constants_reproduce_the_published_times_they_were_fitted_on():
    """bench.U and bench.T_LAUNCH (from `bench.py --calibrate`) give back the three "fit" figures of bench.PUBLISHED
    within 1% on the counts the current code makes. The batch-1 teacher at K = 128 is priced from K = 2 and 3 (launches
    exactly linear in K; its FLOPs, 1.5% of its time, nearly so), the two training steps are counted as they are."""
    fits = [p for p in bench.PUBLISHED if p[4] == "fit"]
    assert [(p[2], p[5]) for p in fits] == [(bench.A100, "train"), (bench.A100, "sample_teacher"), (bench.H100, "train")]
    for what, source, gpu, published, role, stage, name, opts in fits:
        if stage == "sample_teacher":
            w2, w3 = (bench.published_work(stage, name, {**opts, "num_iter": K}) for K in (2, 3))
            work = {k: w2[k] + (opts["num_iter"] - 2) * (w3[k] - w2[k]) for k in w2}
        else:
            work = bench.published_work(stage, name, opts)
        assert bench.step_seconds(work, gpu) == pytest.approx(published, rel=0.01), what


def test_round_tf32_rounds_to_nearest_ties_away_on_known_bits():
    bits = torch.tensor([0x3F800000, 0x3F800FFF, 0x3F801000, 0x3F801001, 0x3F803000, 0xBF801000 - 2 ** 32,
                         0x3FFFF000, 0x00000FFF], dtype=torch.int32)
    want = torch.tensor([0x3F800000, 0x3F800000, 0x3F802000, 0x3F802000, 0x3F804000, 0xBF802000 - 2 ** 32,
                         0x40000000, 0x00000000], dtype=torch.int32)
    # 1.0 stays; below half an ulp (2^-10) goes down; a tie goes away from zero, for either sign; a carry moves into
    # the exponent (1.99999 -> 2.0); a tiny denormal goes to 0
    assert torch.equal(bench.round_tf32(bits.view(torch.float32)).view(torch.int32), want)
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(0))
    r = bench.round_tf32(x)
    assert torch.all(r.view(torch.int32) & 0x1FFF == 0)                      # 10 mantissa bits left
    assert ((r - x).abs() / x.abs()).max() <= 2 ** -11                      # half an ulp of a 10-bit mantissa


def test_tf32_matmul_error_lies_between_fp32_and_bf16():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(256, 512, generator=gen), torch.randn(512, 128, generator=gen)
    exact = a.double() @ b.double()
    err = lambda y: ((y.double() - exact).norm() / exact.norm()).item()
    with bench.TF32Matmul():
        tf32 = torch.nn.functional.linear(a, b.t())                         # nn.Linear's path: addmm / mm
    torch.testing.assert_close(tf32, bench.round_tf32(a) @ bench.round_tf32(b))
    bf16 = (a.bfloat16() @ b.bfloat16()).float()
    assert err(a @ b) < err(tf32) / 20 and err(tf32) < err(bf16) / 2


def test_tf32_keeps_gsims_direction_far_better_than_bf16():
    """bench.tf32_check on a small head: TF32's Delta stays close to fp32's where bf16's turns (the MAR-B numbers are
    in docs/results.md)."""
    out = bench.tf32_check(mar.mar_tiny().diffloss.net, rows=512, targets=(0.04,))
    level = out["levels"][0]
    assert level["median_abs_delta"] == pytest.approx(0.04, rel=0.1)
    assert level["tf32"]["mean"] > 0.99 > level["bf16"]["mean"]
    assert level["tf32"]["worst"] > level["bf16"]["worst"]
