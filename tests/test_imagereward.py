"""ImageReward (rewards.ImageReward): parity with the official THUDM/ImageReward code, strict loading, the two
preprocessing paths, gradients, local-only loading, and its place in evaluate.py and rl_refine.py.

The parity vectors (../shared/testdata/imagereward_reference_small.pt) were made by running the official code on a
small random-weight model in the released key layout (ViT width 64, 2 blocks, 4 heads; BERT width 48, 2 layers,
4 heads, the full 30,524-token vocabulary and the real MLP head), with three prompts of 7, 20 and 35 tokens.
"""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import rewards
import rl_refine
from conftest import shared_file


@pytest.fixture(scope="module")
def ref():
    return torch.load(shared_file("testdata", "imagereward_reference_small.pt"), weights_only=True)


@pytest.fixture(scope="module")
def ref_model(ref):
    cfg = ref["config"]
    return rewards.ImageReward.from_state_dict(ref["state_dict"], cfg["vision_heads"], cfg["text_heads"])


def max_err(a, b):
    return (a - b).abs().max().item()


def test_matches_the_official_code(ref, ref_model):
    """Image tokens, the [CLS] text feature, the raw and the normalised reward, all at 1e-5 (in fact to the bit:
    the operators run in the official order). Prompts of 7, 20 and 35 tokens exercise the padding mask."""
    with torch.no_grad():
        image, text = ref_model.encode(ref["pixel_values"], ref["input_ids"], ref["attention_mask"])
        raw = ref_model.mlp.layers(text)[:, 0]
        reward = ref_model(ref["pixel_values"], ref["input_ids"], ref["attention_mask"])
    assert image.shape == (3, 197, 64) and text.shape == (3, 48)
    for ours, theirs in ((image, "image_embeds"), (text, "text_features"), (raw, "raw_reward"), (reward, "reward")):
        assert max_err(ours, ref[theirs]) <= 1e-5, theirs
    # the normalisation constants are the official ones (the vectors carry them)
    assert (rewards.IMAGEREWARD_MEAN, rewards.IMAGEREWARD_STD) == (ref["mean"], ref["std"])


def test_padding_is_masked(ref, ref_model):
    """The 7-token prompt's score does not depend on what its 28 padded positions hold: the mask hides them."""
    ids, mask = ref["input_ids"][:1].clone(), ref["attention_mask"][:1]
    with torch.no_grad():
        a = ref_model(ref["pixel_values"][:1], ids, mask)
        ids[0, 10:] = 1999
        b = ref_model(ref["pixel_values"][:1], ids, mask)
        c = ref_model(ref["pixel_values"][:1], ids, torch.ones_like(mask))  # unmasked: the padding now counts
    assert max_err(a, b) <= 1e-4 and max_err(a, c) > 1e-2


def test_pil_preprocessing_matches_the_official_transform(ref):
    """A non-square 300 x 257 uint8 image through torchvision's Resize(224, BICUBIC) / CenterCrop(224) / ToTensor /
    Normalize, as the official _transform(224) ran it."""
    pre = ref["preprocess"]
    x = rewards.imagereward_preprocess(Image.fromarray(pre["image_uint8"].numpy()))
    assert x.shape == (3, 224, 224) and max_err(x, pre["pixel_values"]) <= 1e-5


def smooth_image(h=256, w=320):
    """A smooth uint8 RGB image (gradients and low-frequency waves): what a resize does not alias."""
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    rgb = np.stack([0.5 + 0.4 * np.sin(3 * xx + 2 * yy), yy, 0.5 + 0.4 * np.cos(4 * xx * yy)], -1)
    return (rgb * 255).round().astype(np.uint8)                                        # (h, w, 3)


def test_tensor_path_is_close_to_the_pil_path(ref_model):
    """clip_preprocess (differentiable, what the RL reward sees) against imagereward_preprocess (PIL, what the
    official package sees) on a smooth non-square image: within ~1.5 uint8 levels everywhere (PIL rounds the resized
    image to uint8), and rewards within 1% of how far a mirrored image moves them."""
    img = smooth_image()
    pil = rewards.imagereward_preprocess(Image.fromarray(img))                          # (3, 224, 224)
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 127.5 - 1               # (1, 3, 256, 320)
    tensor = rewards.clip_preprocess(x, 224)[0]
    level = 1 / 255 / min(rewards.CLIP_STD)                                             # one uint8 step, normalised
    assert max_err(tensor, pil) < 1.5 * level
    assert max_err(tensor, pil.flip(-1)) > 20 * level  # the check can fail: a mirrored crop is far away
    ids = torch.tensor([[101, 2023, 102] + [0] * 32])
    mask = (ids > 0).long()
    with torch.no_grad():
        r = ref_model(torch.stack([tensor, pil, pil.flip(-1)]), ids.repeat(3, 1), mask.repeat(3, 1))
    assert abs(r[0] - r[1]) < 0.01 * abs(r[1] - r[2])


def test_strict_loading_names_the_key(ref):
    sd = dict(ref["state_dict"])
    for extra in rewards.IMAGEREWARD_UNUSED:  # the released file's unused entries are accepted...
        assert extra in sd
    missing = {k: v for k, v in sd.items() if k != "blip.text_encoder.encoder.layer.1.crossattention.self.key.bias"}
    with pytest.raises(ValueError, match=r"missing key 'blip\.text_encoder\.encoder\.layer\.1\.crossattention"):
        rewards.ImageReward.from_state_dict(missing, 4, 4)
    unexpected = {**sd, "blip.itm_head.weight": torch.zeros(2, 48)}  # ...anything else is refused, by name
    with pytest.raises(ValueError, match=r"unexpected key 'blip\.itm_head\.weight'"):
        rewards.ImageReward.from_state_dict(unexpected, 4, 4)
    no_norm = {k: v for k, v in sd.items() if k != "blip.visual_encoder.blocks.0.norm1.weight"}  # block 0, 1 kept
    with pytest.raises(ValueError, match=r"missing key 'blip\.visual_encoder\.blocks\.0\.norm1\.weight'"):
        rewards.ImageReward.from_state_dict(no_norm, 4, 4)
    with pytest.raises(ValueError, match="missing key 'mlp.layers.0.weight'"):
        rewards.ImageReward.from_state_dict({k: v for k, v in sd.items() if not k.startswith("mlp.")}, 4, 4)


def test_gradients_reach_the_pixels_and_labels_pick_prompts(ref, ref_model):
    ids, mask = ref["input_ids"], ref["attention_mask"]
    fn = rewards.ImageRewardScore(ref_model, ids, mask)
    images = (torch.rand(2, 3, 240, 256) * 2 - 1).requires_grad_(True)
    labels = torch.tensor([2, 0])
    r = fn(images, labels)
    r.sum().backward()
    g = images.grad
    assert r.shape == (2,) and torch.isfinite(g).all() and (g[0].abs().sum() > 0) and (g[1].abs().sum() > 0)
    assert all(not p.requires_grad for p in ref_model.parameters())  # a frozen reward: no gradient in the model
    with torch.no_grad():
        px = rewards.clip_preprocess(images, 224)
        direct = ref_model(px, ids[[2, 0]], mask[[2, 0]])
        swapped = fn(images, torch.tensor([0, 2]))
    assert max_err(r.detach(), direct) <= 1e-5 and max_err(r.detach(), swapped) > 1e-3


# ---- local files: a tiny random ImageReward.pt and a tiny bert tokenizer folder, nothing downloaded ----------------

TINY = dict(image_size=32, patch=16, vision_width=32, vision_depth=1, vision_heads=16, vision_mlp=64,
            max_positions=40, text_width=24, text_depth=1, text_heads=12, text_mlp=48, head=(16, 8, 8, 4, 1))


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    """(ImageReward.pt in the released layout with its unused entries, a bert-base-uncased-like tokenizer folder).
    Widths divide by the released head counts (16, 12), so the loaders' defaults build it."""
    d = tmp_path_factory.mktemp("imagereward")
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789'-,.")  # every class name tokenises, letter by letter
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + ["##" + c for c in chars]
    (d / "bert").mkdir()
    (d / "bert" / "vocab.txt").write_text("\n".join(vocab) + "\n")  # a folder with bert's vocab.txt alone loads
    torch.manual_seed(0)
    model = rewards.ImageReward(vocab=len(vocab), **TINY)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    sd = {**model.state_dict(), "blip.vision_proj.weight": torch.zeros(8, 32), "blip.vision_proj.bias": torch.zeros(8),
          "blip.text_proj.weight": torch.zeros(8, 24), "blip.text_proj.bias": torch.zeros(8),
          "blip.text_encoder.embeddings.position_ids": torch.arange(40)[None]}
    torch.save(sd, d / "ImageReward.pt")
    return str(d / "ImageReward.pt"), str(d / "bert")


def test_loader_reads_local_files_only(tiny_files, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a download attempt would fail loudly instead of reaching out
    weights, tok = tiny_files
    fn = rewards.load_imagereward(weights, tok)
    labels = rewards.imagenet_prompts().index("goldfish")
    assert fn.input_ids.shape == (1000, 35) and fn.input_ids[labels, 0] == 2            # [CLS] first
    assert fn.attention_mask[labels].sum() == len("goldfish") + 2                        # g ##o ##l ... + [CLS] [SEP]
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        rewards.load_imagereward(str(tmp_path / "ImageReward.pt"), tok)
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        rewards.load_imagereward(weights, str(tmp_path / "bert-base-uncased"))  # a hub name, not a folder here
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        rewards.load_imagereward(weights, "bert-base-uncased")


def test_evaluate_reports_each_metric_with_a_confidence_interval(tiny_files, pickscore_dirs, tmp_path):
    """evaluate.py with only text-image scores (no FID files): ImageReward and PickScore with their 95% intervals,
    the ImageReward mean equal to scoring the saved PNGs one by one through the PIL path."""
    weights, tok = tiny_files
    rng = np.random.default_rng(0)
    arr = (rng.integers(0, 256, (12, 8, 10, 3)).repeat(4, 1).repeat(4, 2)).astype(np.uint8)   # (12, 32, 40, 3)
    labels = np.arange(12) * 83 % 1000
    np.savez(tmp_path / "s.npz", arr_0=arr, labels=labels)
    out = evaluate.main(["--samples", str(tmp_path / "s.npz"), "--imagereward-weights", weights,
                         "--imagereward-tokenizer", tok, "--pickscore-model", pickscore_dirs[0],
                         "--pickscore-processor", pickscore_dirs[1], "--device", "cpu", "--batch-size", "5",
                         "--json", str(tmp_path / "m.json")])
    saved = json.load(open(tmp_path / "m.json"))
    fn = rewards.load_imagereward(weights, tok)
    with torch.no_grad():
        x = torch.stack([rewards.imagereward_preprocess(Image.fromarray(a), 32) for a in arr])
        each = fn.score(x, torch.from_numpy(labels)).numpy().astype(np.float64)
    half = 1.959964 * each.std(ddof=1) / np.sqrt(len(each))
    assert saved["imagereward"] == pytest.approx(each.mean(), abs=1e-5)
    assert saved["imagereward_ci95"] == pytest.approx([each.mean() - half, each.mean() + half], abs=1e-5)
    lo, hi = saved["pickscore_ci95"]
    assert lo < saved["pickscore"] < hi and saved["num_images"] == 12 and "fid" not in saved
    assert out["imagereward_ci95"] == saved["imagereward_ci95"]


def test_evaluate_and_rl_refuse_half_given_files(tiny_files, tmp_path):
    weights, tok = tiny_files
    with pytest.raises(SystemExit):  # argparse's error: the tokenizer folder is missing
        evaluate.main(["--samples", "s.npz", "--imagereward-weights", weights])
    with pytest.raises(SystemExit):
        rl_refine.get_args(["--student", "s.pth", "--vae", "kl16.ckpt", "--out-dir", "o", "--reward", "imagereward",
                            "--imagereward-weights", weights])
    args = rl_refine.get_args(["--student", weights, "--vae", weights, "--out-dir", str(tmp_path / "o"), "--reward",
                               "imagereward", "--imagereward-weights", weights, "--imagereward-tokenizer",
                               str(tmp_path / "no-bert")])
    with pytest.raises(rl_refine.common.UsageError, match="--imagereward-tokenizer"):
        rl_refine.check_inputs(args)  # before any work
    args.imagereward_tokenizer = tok
    rl_refine.check_inputs(args)
    fn, evaluator = rl_refine.build_reward(args, torch.device("cpu"))
    assert isinstance(fn, rewards.ImageRewardScore) and evaluator is None


def test_dry_run_counts_imagereward_at_its_real_size():
    """bench.py --dry-run --rl-reward imagereward: RL's step at MAR-B holds policy, reference and EMA (3 x 207,924,768
    parameters), the KL-16 decoder (66,456,019) and ImageReward-v1.0 (446,206,689: ViT-L/16 303.3M, BERT 142.0M, the
    head 0.9M), all fp32, and the prompt table's two int64 (1000, 35) buffers."""
    import bench
    assert sum(p.numel() for p in rewards.ImageReward(**rewards.IMAGEREWARD_CONFIG).parameters()) == 446_206_689
    row = bench.dry_stage("rl", "mar_base", num_iter=2, reward="imagereward")
    params = 3 * 207_924_768 + 66_456_019 + 446_206_689
    assert row["parameters_gib"] == pytest.approx((params * 4 + 2 * 1000 * 35 * 8) / 2 ** 30, rel=1e-6)
    assert row["fits_80gb"]
