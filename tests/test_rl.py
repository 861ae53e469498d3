"""Stage 2: rewards loaded through the real loading code (tiny random models saved to disk), gradients from the reward
through preprocessing and VAE decode into the generator, and a short RL run with the regulariser and selection."""
import copy
import json
import os

import pytest
import torch

import data
import evaluate
import mar
import rewards
import rl_refine
import vae
from conftest import randomize_

ONE_STEP = mar.HeadSampler(one_step=True)


@pytest.fixture(scope="module")
def open_clip_file(tmp_path_factory):
    """A tiny open_clip model registered from a JSON config, its random weights saved to a file."""
    import open_clip
    d = tmp_path_factory.mktemp("openclip")
    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (d / "tiny-test-clip.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(str(d / "tiny-test-clip.json"))
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-test-clip")
    torch.save(model.state_dict(), d / "tiny.pt")
    return "tiny-test-clip", str(d / "tiny.pt")


def tiny_generator_and_vae():
    """A MAR over 4x4 latents of 16 channels and a small VAE decoding them to 8x8 RGB (one upsampling level)."""
    torch.manual_seed(0)
    model = randomize_(mar.mar_tiny(img_size=8, vae_stride=2, class_num=1000, buffer_size=4), std=0.02).eval()
    ae = vae.AutoencoderKL(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), resolution=8).eval()
    return model, data.Tokenizer(ae.requires_grad_(False))


def sample_with_grads(model, labels, run_step):
    """Four AR steps of the one-step head with gradients, each run by `run_step`; (samples, parameter grads)."""
    model.zero_grad()
    out = model.sample_tokens(2, num_iter=4, labels=labels, head=ONE_STEP, generator=torch.Generator().manual_seed(0),
                              run_step=run_step)
    out.square().mean().backward()
    return out.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def test_per_step_checkpointing_gives_the_same_gradients():
    model, labels = tiny_generator_and_vae()[0], torch.tensor([1, 2])
    out_a, g_a = sample_with_grads(model, labels, rl_refine.RLSteps(4, use_checkpoint=False))
    out_b, g_b = sample_with_grads(model, labels, rl_refine.RLSteps(4, use_checkpoint=True))
    torch.testing.assert_close(out_a, out_b)
    assert g_a.keys() == g_b.keys() and len(g_a) > 10
    for k in g_a:
        torch.testing.assert_close(g_a[k], g_b[k], rtol=1e-4, atol=1e-6, msg=k)


def test_truncated_backprop_leaves_early_steps_without_gradient():
    """truncate_k = 1: only the last AR step keeps a graph. Tokens fixed in the earlier steps then carry no gradient,
    so the gradient differs from the full one but is not zero."""
    model, labels = tiny_generator_and_vae()[0], torch.tensor([1, 2])
    out_full, g_full = sample_with_grads(model, labels, rl_refine.RLSteps(4, use_checkpoint=False))
    outputs, last = [], rl_refine.RLSteps(4, use_checkpoint=False, truncate_k=1)

    def keep(step, ar_step, *inputs):  # RLSteps, recording what each AR step returns
        outputs.append(last(step, ar_step, *inputs))
        return outputs[-1]

    out_last, g_last = sample_with_grads(model, labels, keep)
    torch.testing.assert_close(out_full, out_last)  # same samples
    k = "diffloss.net.final_layer.linear.weight"
    assert g_last[k].abs().sum() > 0 and not torch.allclose(g_last[k], g_full[k])
    assert [o.requires_grad for o in outputs] == [False, False, False, True]


def test_reference_penalty_is_zero_at_the_start_and_differentiable_after():
    """RLSteps' DRaFT+ penalty: exactly 0 while the policy equals the frozen reference; once they differ, positive,
    with a gradient in the policy only, and the reference's tokens are its own one-step x0 for the policy's context
    and noise (checked at the first AR step, rebuilt by hand from the same generator)."""
    policy, labels = tiny_generator_and_vae()[0], torch.tensor([1, 2])
    reference = copy.deepcopy(policy).requires_grad_(False)
    gen = lambda: torch.Generator().manual_seed(0)
    steps = rl_refine.RLSteps(4, reference=reference)
    out = policy.sample_tokens(2, num_iter=4, labels=labels, head=ONE_STEP, generator=gen(), run_step=steps)
    assert len(steps.records) == 4 and steps.penalty(policy.patchify(out)).item() == 0.0
    with torch.no_grad():
        policy.diffloss.net.final_layer.linear.bias.add_(0.1)  # the policy's x0 moves by 0.074 per channel
    steps = rl_refine.RLSteps(4, reference=reference)
    out = policy.sample_tokens(2, num_iter=4, labels=labels, head=ONE_STEP, generator=gen(), run_step=steps)
    penalty = steps.penalty(policy.patchify(out))
    assert penalty.item() > 0 and not any(ref.requires_grad for _, ref in steps.records)
    penalty.backward()
    assert policy.diffloss.net.final_layer.linear.bias.grad.abs().sum() > 0
    assert all(p.grad is None for p in reference.parameters())
    # the first AR step by hand: everything masked, the sampler's draws in its order (orders, then the step's noise)
    g, L, C = gen(), policy.seq_len, policy.token_embed_dim
    orders = policy.sample_orders(2, g)
    k = mar.mask_schedule(L, 4)[0][0]
    noise = ONE_STEP.noise(reference.diffloss, 2, k, g, "cpu")
    pos = orders[:, L - k:].sort(dim=1).values
    with torch.no_grad():
        c = reference.conditions(torch.zeros(2, L, C), torch.ones(2, L), reference.class_emb(labels))
        c = mar.gather_rows(c, pos).flatten(0, 1)
        x0 = mar.one_step_x0(reference.diffloss.net, noise, c, reference.diffloss.train_diffusion).reshape(2, k, C)
    assert torch.equal(steps.records[0][0], pos)
    torch.testing.assert_close(steps.records[0][1], x0)


def test_rl_steps_refuse_a_longer_sampler_run():
    model = tiny_generator_and_vae()[0]
    with pytest.raises(ValueError, match="num_iter = 2"):
        model.sample_tokens(1, num_iter=3, labels=torch.tensor([1]), head=ONE_STEP, run_step=rl_refine.RLSteps(2))


@pytest.mark.parametrize("kind", ["pickscore", "clip"])
def test_reward_gradient_reaches_the_generator(kind, pickscore_dirs, open_clip_file):
    reward = rewards.PickScoreReward.from_dirs(*pickscore_dirs) if kind == "pickscore" else \
        rewards.ClipReward(*open_clip_file)
    model, tok = tiny_generator_and_vae()
    labels = torch.tensor([1, 207])
    latents = model.sample_tokens(2, num_iter=2, labels=labels, head=ONE_STEP,
                                  generator=torch.Generator().manual_seed(0),
                                  run_step=rl_refine.RLSteps(2, use_checkpoint=True))
    images = tok.decode(latents)                    # (2, 3, 8, 8): CLIP preprocessing resizes to 32
    score = reward(images, labels)
    assert score.shape == (2,) and torch.isfinite(score).all()
    (-score.mean()).backward()
    for name in ("diffloss.net.final_layer.linear.weight", "encoder_blocks.0.attn.qkv.weight"):
        g = dict(model.named_parameters())[name].grad
        assert g is not None and g.abs().sum() > 0, name
    assert all(p.grad is None for p in reward.parameters())  # the reward model is frozen


def test_reward_loaders_refuse_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        rewards.PickScoreReward.from_dirs(str(tmp_path / "nope"), str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        rewards.ClipReward("ViT-B-32", str(tmp_path / "nope.pt"))


def test_clip_preprocess_matches_the_processor(pickscore_dirs):
    """Our differentiable preprocessing equals transformers' CLIPImageProcessor on the same image (resize + crop +
    normalise), up to the resampling implementation."""
    from transformers import AutoProcessor
    proc = AutoProcessor.from_pretrained(pickscore_dirs[1], local_files_only=True)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 48), torch.linspace(0, 1, 64), indexing="ij")
    img = torch.stack([torch.sin(3 * xx + yy), torch.cos(2 * yy), xx * yy * 2 - 1])[None].clamp(-1, 1)  # smooth
    pil = (((img[0] + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy())
    theirs = proc(images=pil, return_tensors="pt")["pixel_values"]
    ours = rewards.clip_preprocess(((torch.from_numpy(pil).permute(2, 0, 1)[None].float() / 127.5) - 1), 32)
    assert ours.shape == theirs.shape == (1, 3, 32, 32)
    # PIL's and torch's bicubic (and the rounding of the resized width) differ slightly; a layout error does not:
    assert (ours - theirs).abs().mean() < 0.04
    assert (ours.flip(-1) - theirs).abs().mean() > 0.2 and (ours.flip(1) - theirs).abs().mean() > 0.2


def test_toy_rl_run_logs_regularises_and_selects(toy_student_ckpt, toy_classifier_file, tmp_path):
    out = str(tmp_path / "rl")
    rl_refine.main(["--preset", "toy", "--student", toy_student_ckpt, "--out-dir", out, "--max-steps", "4",
                    "--eval-every", "2", "--log-every", "1", "--eval-images", "40", "--global-batch-size", "4",
                    "--classifier", toy_classifier_file, "--lr", "1e-4"])
    recs = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    train = [r for r in recs if "reward" in r]
    assert len(train) == 4 and all(r["reward"] <= 0 for r in train)  # log-probabilities
    assert train[0]["penalty"] == 0.0 and train[-1]["penalty"] > 0     # policy == frozen start at step 1 only
    assert sum("heldout_reward" in r for r in recs) == 3               # start, step 2, step 4
    report = json.load(open(os.path.join(out, "eval.json")))
    assert report["best"]["toy_fid"] <= 1.3 * report["start"]["toy_fid"]
    best = mar.read_checkpoint(os.path.join(out, "checkpoint-best.pth"))
    assert best["step"] == report["best"]["step"]
    mar.load_mar(os.path.join(out, "checkpoint-last.pth"), mar.MAR(**data.TOY_MODEL))  # loads like any MAR
    assert os.path.exists(os.path.join(out, "reward_vs_fid.png"))
    assert report["start"]["drift"] == 0.0 and report["last"]["drift"] > 0  # the held-out DRaFT+ distance
    vae_in = mar.read_checkpoint(toy_student_ckpt)["toy_vae"]  # the RL checkpoints pass the student's toy VAE on
    for ck in (best, mar.read_checkpoint(os.path.join(out, "checkpoint-last.pth"))):
        assert all(torch.equal(ck["toy_vae"][k], v) for k, v in vae_in.items())


def test_toy_reward_gradient_crosses_the_toy_decoder(toy_ckpt):
    """On the toy, as on ImageNet, the reward's gradient reaches the generator through the VAE decoder: it is
    non-zero in the head and the transformer, and nothing in the decoder or the classifier trains."""
    model = mar.load_mar(toy_ckpt, mar.MAR(**data.TOY_MODEL), verbose=False)
    tok, clf = data.toy_tokenizer_of(toy_ckpt), evaluate.ToyClassifier().requires_grad_(False)
    labels = torch.tensor([3, 7])
    latents = model.sample_tokens(2, num_iter=2, labels=labels, head=ONE_STEP,
                                  generator=torch.Generator().manual_seed(0))
    images = tok.decode(latents)
    assert images.shape == (2, 1, 16, 16) and images.requires_grad
    clf(images).log_softmax(1).gather(1, labels[:, None]).sum().backward()
    for name in ("diffloss.net.final_layer.linear.weight", "encoder_blocks.0.attn.qkv.weight"):
        g = dict(model.named_parameters())[name].grad
        assert g is not None and g.abs().sum() > 0, name
    assert all(p.grad is None for p in list(tok.vae.parameters()) + list(clf.parameters()))


def distance_moved(ckpt_path, start):
    """(|model_ema - start|, |model - start|) over all tensors of a saved RL run."""
    ck = mar.read_checkpoint(ckpt_path)
    d = lambda part: sum((ck[part][k].double() - start[k].double()).square().sum() for k in start).sqrt().item()
    return d("model_ema"), d("model")


def test_rl_update_shows_in_model_ema(toy_student_ckpt, toy_classifier_file, tmp_path):
    """model_ema is what every tool loads: with the script's own EMA default (0.9999 with warm-up), a short run
    leaves it at least half way from the start to the policy; the literal fixed 0.9999 would not move it."""
    start = mar.read_checkpoint(toy_student_ckpt)["model_ema"]
    base = ["--preset", "toy", "--student", toy_student_ckpt, "--max-steps", "4", "--eval-every", "0",
            "--global-batch-size", "4", "--classifier", toy_classifier_file, "--lr", "1e-4"]
    rl_refine.main(base + ["--out-dir", str(tmp_path / "warm")])
    ema, policy = distance_moved(str(tmp_path / "warm" / "checkpoint-last.pth"), start)
    assert policy > 0 and ema >= 0.5 * policy
    rl_refine.main(base + ["--out-dir", str(tmp_path / "fixed"), "--no-ema-warmup"])
    ema, policy = distance_moved(str(tmp_path / "fixed" / "checkpoint-last.pth"), start)
    assert ema < 0.01 * policy


def test_reward_sees_the_pixels_the_png_keeps():
    """Decoder output beyond [-1, 1] is clipped in the saved PNG, so the reward's preprocessing clips it too."""
    x = torch.linspace(-2, 2, 3 * 16 * 16).reshape(1, 3, 16, 16)
    assert torch.equal(rewards.clip_preprocess(x, 16), rewards.clip_preprocess(x.clamp(-1, 1), 16))
    assert not torch.equal(rewards.clip_preprocess(x * 0.9, 16), rewards.clip_preprocess(x.clamp(-1, 1), 16))


def test_default_run_length_follows_the_paper_compute():
    """Note 2 of rl_refine.py: 5 epochs of ImageNet's 1,281,167 labels at global batch 16 (not 5 x 1000 prompts)."""
    args = rl_refine.get_args(["--student", "x", "--vae", "v", "--pickscore-model", "p", "--out-dir", "o"])
    assert rl_refine.run_length(args) == 400_365
    assert rl_refine.heldout_labels(400, 1000)[:4].tolist() == [0, 2, 5, 7]
    assert rl_refine.heldout_labels(400, 1000).max() >= 990  # spread over all classes, not 0-399
