"""Rewards and text-image scores: images in [-1, 1] (B, 3, H, W) and class ids (B,) -> (B,) scores, differentiable.

MARVAL-RL (rl_refine.py) back-propagates them into the generator; evaluate.py reports them for a set of samples.
  * PickScore (Kirstain et al. 2023, arXiv:2305.01569): a CLIP ViT-H/14 fine-tuned on human preferences, from local
    transformers directories (the model `yuvalkirstain/PickScore_v1`, the processor
    `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`).
  * CLIP score: 100 cos(image, "a photo of a {class}.") with an open_clip model from a local weights file.
The prompts are ImageNet's class names as open_clip ships them. Preprocessing is written in torch (bicubic resize
with antialiasing, center crop, CLIP's mean and std) so that gradients reach the pixels; each model's prompt
features are computed once (`prompt_table`) and looked up by label on the labels' device. Nothing is downloaded.
"""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F


CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def clip_preprocess(images, size=224):
    """CLIP's preprocessing in torch, so gradients flow: resize the short side to `size` (bicubic, antialiased),
    center crop, normalise with CLIP's mean/std. images (B, 3, H, W) in [-1, 1].

    Pixels are clamped to [-1, 1] first: the decoder's output can leave that range, the saved PNGs clip it, and a
    reward that sees the unclipped values can be raised by pixels no image will ever show (a reward-hacking channel).
    """
    x = (images.float().clamp(-1, 1) + 1) / 2
    h, w = x.shape[-2:]
    s = size / min(h, w)
    x = F.interpolate(x, size=(max(size, round(h * s)), max(size, round(w * s))), mode="bicubic", antialias=True,
                      align_corners=False)
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    x = x[..., top: top + size, left: left + size]
    mean, std = torch.tensor(CLIP_MEAN, device=x.device), torch.tensor(CLIP_STD, device=x.device)
    return (x - mean[:, None, None]) / std[:, None, None]


def imagenet_prompts():
    """ImageNet entity names (open_clip's bundled IMAGENET_CLASSNAMES): MARVAL-RL's prompts."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
    return list(IMAGENET_CLASSNAMES)


@torch.no_grad()
def prompt_table(encode, prompts, chunk=250):
    """(P, D) L2-normalised text features of every prompt, `encode(list of str) -> (n, D)` run in chunks. Computed
    once: a reward then looks a batch's prompts up by label on the labels' device, with no host copy in the step."""
    # fp32 whatever autocast surrounds the first call (an RL step runs under bf16): every rank, every run, the same table
    with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
        chunks = [encode(prompts[i: i + chunk]).float() for i in range(0, len(prompts), chunk)]  # (n, D) each
    return F.normalize(torch.cat(chunks), dim=-1)


class PickScoreReward(nn.Module):
    """PickScore (Kirstain et al. 2023): logit_scale.exp() * cos(image, prompt) of a CLIP-H fine-tuned on human
    preferences. Local directories only: model `yuvalkirstain/PickScore_v1`, processor
    `laion/CLIP-ViT-H-14-laion2B-s32B-b79K` (snapshots saved with save_pretrained or downloaded by hand)."""

    def __init__(self, model, tokenize, size=224, prompts=None):
        """model: a transformers CLIPModel; tokenize(list of str) -> its text inputs (a dict of tensors); size: the
        image side it reads. `from_dirs` builds all three from the local snapshots."""
        super().__init__()
        self.model, self.tokenize, self.size = model.eval().requires_grad_(False), tokenize, size
        self.prompts = prompts or imagenet_prompts()
        self._text = None  # (P, D) features of every prompt, computed on first use

    @classmethod
    def from_dirs(cls, model_dir, processor_dir, prompts=None):
        from transformers import AutoProcessor, CLIPModel
        for d in (model_dir, processor_dir):
            if not os.path.isdir(d):
                raise FileNotFoundError(f"{d!r} is not a local directory; PickScore is never downloaded")
        processor = AutoProcessor.from_pretrained(processor_dir, local_files_only=True)
        model = CLIPModel.from_pretrained(model_dir, local_files_only=True)
        crop = processor.image_processor.crop_size  # a dict (transformers 4) or a SizeDict (5)
        size = int(crop["height"] if isinstance(crop, dict) else getattr(crop, "height", crop))
        tokenize = lambda texts: processor(text=texts, padding=True, truncation=True, max_length=77,
                                           return_tensors="pt")
        return cls(model, tokenize, size, prompts)

    @staticmethod
    def _features(out):  # transformers 5 returns an output object, 4 a tensor
        return out if torch.is_tensor(out) else out.pooler_output

    def text_features(self, labels):
        """(B, D) normalised prompt features of class labels (B,)."""
        if self._text is None:
            dev = next(self.model.parameters()).device
            encode = lambda texts: self._features(self.model.get_text_features(**self.tokenize(texts).to(dev)))
            self._text = prompt_table(encode, self.prompts)
        return self._text[labels]

    def forward(self, images, labels):
        img = self._features(self.model.get_image_features(pixel_values=clip_preprocess(images, self.size)))
        cos = (F.normalize(img.float(), dim=-1) * self.text_features(labels)).sum(-1)
        return self.model.logit_scale.exp() * cos


class ClipReward(nn.Module):
    """CLIP score 100 * cos(image, "a photo of a {class}.") with an open_clip model from a local weights file."""

    def __init__(self, model_name, weights_path, prompts=None):
        super().__init__()
        import open_clip
        if not os.path.isfile(weights_path):
            raise FileNotFoundError(f"open_clip weights {weights_path!r} not found; nothing is downloaded")
        self.model = open_clip.create_model(model_name, pretrained=weights_path).eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(model_name)
        size = self.model.visual.image_size
        self.size = size[0] if isinstance(size, (tuple, list)) else size
        self.prompts = [f"a photo of a {p}." for p in (prompts or imagenet_prompts())]
        self._text = None  # (P, D) features of every prompt, computed on first use

    def forward(self, images, labels):
        if self._text is None:
            dev = next(self.model.parameters()).device
            self._text = prompt_table(lambda texts: self.model.encode_text(self.tokenizer(texts).to(dev)), self.prompts)
        text = self._text[labels]                                                    # (B, D)
        img = F.normalize(self.model.encode_image(clip_preprocess(images, self.size)).float(), dim=-1)
        return 100.0 * (img * text).sum(-1)
