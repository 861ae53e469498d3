"""MAR's outer loop (schedule, CFG scales) against the official trace, and the teacher / one-step samplers."""
import json
import math

import pytest
import torch

import mar
from conftest import randomize_, shared_file


ONE_STEP = mar.HeadSampler(one_step=True)


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(img_size=4, vae_stride=1, patch_size=1, class_num=10, buffer_size=4, num_sampling_steps="10")
    return randomize_(mar.mar_tiny(**{**cfg, **kw}).eval(), seed=seed)


def test_schedule_matches_official_trace():
    """Tokens per step and CFG per step for every (L, K, cfg, schedule) the official sampler was traced at."""
    trace = json.loads(shared_file("testdata", "mar_sampler_schedule.json").read_text())
    for case in trace:
        L, K = case["seq_len"], case["num_iter"]
        sched = mar.mask_schedule(L, K)
        assert [n for n, _ in sched] == case["tokens_per_step"], (L, K)
        cfgs = [mar.cfg_scale_at(case["cfg"], L, m, case["cfg_schedule"]) for _, m in sched]
        assert cfgs == pytest.approx(case["cfg_per_step"], rel=1e-6, abs=1e-6), case


def test_schedule_examples_by_hand():
    """MAR sec. 4.2's cosine schedule worked by hand: after step 1 of 4, floor(256 cos(pi/8)) = 236 stay masked."""
    assert [n for n, _ in mar.mask_schedule(256, 4)] == [20, 55, 84, 97]
    assert [n for n, _ in mar.mask_schedule(256, 8)] == [5, 15, 24, 31, 39, 45, 48, 49]
    for K in (1, 2, 16, 64, 100, 256):
        assert sum(n for n, _ in mar.mask_schedule(256, K)) == 256
    # linear CFG at the last step still uses mask_len = 1: 1 + 1.9 * 15/16 = 2.78125 for L = 16, not 2.9
    assert mar.cfg_scale_at(2.9, 16, mar.mask_schedule(16, 4)[-1][1]) == pytest.approx(2.78125)
    with pytest.raises(NotImplementedError):
        mar.cfg_scale_at(2.0, 16, 3, "cosine")


@pytest.mark.parametrize("K", [1, 3, 16])
def test_sampler_reveals_the_scheduled_tokens(K, monkeypatch):
    """Count the tokens the head is asked for at each AR step of a real sampler run."""
    model, seen = tiny(), []
    original = mar.one_step_x0

    def spy(net, z, c, *a, **kw):
        seen.append(len(c) // 2)  # batch of 2
        return original(net, z, c, *a, **kw)

    monkeypatch.setattr(mar, "one_step_x0", spy)
    with torch.no_grad():
        out = model.sample_tokens(2, num_iter=K, labels=torch.tensor([1, 2]), head=ONE_STEP)
    assert seen == [n for n, _ in mar.mask_schedule(16, K)]
    assert out.shape == (2, 16, 4, 4) and torch.isfinite(out).all()


@pytest.mark.parametrize("K, cfg", [(4, 1.0), (5, 2.5), (20, 1.5)])
def test_each_ar_step_reveals_the_end_of_the_masked_prefix_of_the_order(K, cfg):
    """The sampler's bookkeeping, seen by a run_step spy: before each step the mask is exactly the first n_masked
    positions of the image's random order; the step writes the last k of them, sorted; its CFG scale is MAR's
    linear schedule; the steps partition all L positions. K = 20 > L = 16 has steps with nothing to reveal."""
    model, L, seen = tiny(), 16, []

    def spy(step, ar_step, tokens, mask, n_masked, pos, noise):
        seen.append((step, mask.clone(), n_masked, pos, ar_step.keywords["cfg"]))
        return ar_step(tokens, mask, n_masked, pos, noise)

    with torch.no_grad():
        model.sample_tokens(2, num_iter=K, cfg=cfg, labels=torch.tensor([1, 2]), head=mar.HeadSampler(steps=2),
                            generator=torch.Generator().manual_seed(3), run_step=spy)
    orders = model.sample_orders(2, torch.Generator().manual_seed(3))  # the sampler's first draw
    schedule = mar.mask_schedule(L, K)
    assert [s for s, *_ in seen] == [k for k, (n, _) in enumerate(schedule) if n > 0]
    revealed = []
    for step, mask, n_masked, pos, cfg_k in seen:
        n_pred, mask_len = schedule[step]
        want = torch.zeros(2, L).scatter(1, orders[:, :n_masked], 1.0)
        assert torch.equal(mask, want) and n_masked == L - sum(n for n, _ in schedule[:step])
        assert torch.equal(pos, orders[:, n_masked - n_pred: n_masked].sort(dim=1).values)
        assert cfg_k == (mar.cfg_scale_at(cfg, L, mask_len) if cfg != 1.0 else 1.0)
        revealed.append(pos)
    assert torch.equal(torch.cat(revealed, 1).sort(dim=1).values, torch.arange(L).expand(2, -1))


def test_one_step_formula_closed_form():
    """x0 = (z - sqrt(1 - abar_400) eps_hat(z, 400, c)) / sqrt(abar_400) = 1.244193 z - 0.740281 eps_hat."""
    model = tiny()
    abar = model.diffloss.train_diffusion.alphas_cumprod[400].item()
    assert 1 / math.sqrt(abar) == pytest.approx(1.244193, abs=1e-6)
    assert math.sqrt(1 - abar) / math.sqrt(abar) == pytest.approx(0.740281, abs=1e-6)
    z, c = torch.randn(5, 16), torch.randn(5, 64)
    with torch.no_grad():
        eps = model.diffloss.net(z, torch.full((5,), 400), c)[:, :16]
        x0 = mar.one_step_x0(model.diffloss.net, z, c, model.diffloss.train_diffusion)
    torch.testing.assert_close(x0, (z - math.sqrt(1 - abar) * eps) / math.sqrt(abar))


def test_one_step_sampler_equals_manual_single_iteration():
    """K = 1: the whole sampler reduces to conditions with everything masked + the one-step formula."""
    model, labels = tiny(), torch.tensor([3, 7])
    with torch.no_grad():
        head = mar.HeadSampler(one_step=True, temperature=0.9)
        got = model.sample_tokens(2, num_iter=1, labels=labels, head=head,
                                  generator=torch.Generator().manual_seed(5))
        g = torch.Generator().manual_seed(5)
        orders = model.sample_orders(2, g)  # consumed first, as in the sampler
        z = torch.randn((2, 16 * 16), generator=g).reshape(32, 16) * 0.9
        c = model.conditions(torch.zeros(2, 16, 16), torch.ones(2, 16), model.class_emb(labels)).reshape(32, -1)
        x0 = mar.one_step_x0(model.diffloss.net, z, c, model.diffloss.train_diffusion)  # (32, 16)
        want = model.unpatchify(x0.reshape(2, 16, 16))
    assert orders.shape == (2, 16)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("steps", [1, 100])
def test_teacher_mode_runs_with_cfg(steps):
    model = tiny()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        out = model.sample_tokens(2, num_iter=4, cfg=2.0, labels=torch.tensor([0, 1]),
                                  head=mar.HeadSampler(steps=steps), generator=g)
    assert out.shape == (2, 16, 4, 4) and torch.isfinite(out).all()


def test_generator_reproducibility_and_per_image_generators():
    model, labels = tiny(), torch.tensor([1, 2, 3])
    five = mar.HeadSampler(steps=5)
    run = lambda gen, n=3: model.sample_tokens(n, num_iter=4, labels=labels[:n], cfg=1.5, head=five, generator=gen)
    with torch.no_grad():
        a = run(torch.Generator().manual_seed(1))
        b = run(torch.Generator().manual_seed(1))
        c = run(torch.Generator().manual_seed(2))
        per_image = run([torch.Generator().manual_seed(100 + i) for i in range(3)])
        # image 2 sampled alone (with its label) equals image 2 of the batch: it depends only on its generator
        solo = model.sample_tokens(1, num_iter=4, labels=labels[2:], cfg=1.5, head=five,
                                   generator=[torch.Generator().manual_seed(102)])
    assert torch.equal(a, b) and not torch.allclose(a, c)
    torch.testing.assert_close(solo[0], per_image[2], rtol=1e-3, atol=1e-4)  # fp reordering only


def test_one_step_sampler_is_differentiable():
    model = tiny()
    model.train(False)
    out = model.sample_tokens(2, num_iter=3, labels=torch.tensor([1, 2]), head=ONE_STEP,
                              generator=torch.Generator().manual_seed(0))
    out.square().mean().backward()
    for name in ("diffloss.net.final_layer.linear.weight", "encoder_blocks.0.attn.qkv.weight", "class_emb.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
