"""Rewards and text-image scores: images in [-1, 1] (B, 3, H, W) and class ids (B,) -> (B,) scores, differentiable.

MARVAL-RL (rl_refine.py) back-propagates them into the generator; evaluate.py reports them for a set of samples.
  * PickScore (Kirstain et al. 2023, arXiv:2305.01569): a CLIP ViT-H/14 fine-tuned on human preferences, from local
    transformers directories (the model `yuvalkirstain/PickScore_v1`, the processor
    `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`).
  * CLIP score: 100 cos(image, "a photo of a {class}.") with an open_clip model from a local weights file.
  * ImageReward (Xu et al. 2023, arXiv:2304.05977): BLIP's ViT-L/16 and a BERT-base that cross-attends to the
    image, then a linear head; written out here in torch with the released ImageReward.pt's names, loaded strictly
    from local files (`load_imagereward`: the weights file and a bert-base-uncased tokenizer folder).
The prompts are ImageNet's class names as open_clip ships them. Preprocessing is written in torch (bicubic resize
with antialiasing, center crop, CLIP's mean and std) so that gradients reach the pixels; each model's prompt
features (ImageReward: its prompt tokens) are computed once and looked up by label on the labels' device.
Nothing is downloaded.
"""
import math
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image


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
    # fp32 whatever autocast surrounds the first call (an RL step runs under bf16): every rank and run, one table
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


# ----------------------------------------------------------------------------------------------------------------
# ImageReward (Xu et al. 2023, arXiv:2304.05977): a BLIP whose text encoder reads the image, and a linear MLP head
# ----------------------------------------------------------------------------------------------------------------
#
# ImageReward scores a (prompt, image) pair in three steps (THUDM/ImageReward, ImageReward.score):
#   1. BLIP's image encoder, a ViT-L/16 at 224 px: 197 tokens of width 1024 (the class token + 14 x 14 patches).
#   2. BLIP's text encoder, a BERT-base whose 12 layers each add a cross-attention to all 197 image tokens between
#      the self-attention and the feed-forward (BLIP, Li et al. 2022, arXiv:2201.12086, the "image-grounded text
#      encoder"). The prompt's first token ([CLS]) then carries what the image says about the prompt.
#   3. An MLP 768 -> 1024 -> 128 -> 64 -> 16 -> 1 on that token, with NO activation between its layers (the ReLUs are
#      commented out in the official code: the head is one affine map, trained as five), then normalised by the
#      official code's two constants so that scores are roughly N(0, 1) (ImageReward's README).
# The modules below carry the released ImageReward.pt's names (timm's ViT under blip.visual_encoder, BLIP's med.py
# BERT under blip.text_encoder, mlp.layers.{0,2,4,6,7}), so the file loads with strict=True and no key map.

IMAGEREWARD_MEAN, IMAGEREWARD_STD = 0.16717362830052426, 1.0333394966054072  # ImageReward.__init__: self.mean, .std
IMAGEREWARD_TOKENS = 35  # prompts padded / truncated to 35 bert-base-uncased tokens (ImageReward.score)
# The released ImageReward-v1.0: BLIP's ViT-L/16 ('large' in BLIP's create_vit) and med_config.json's BERT-base
# (vocabulary 30,522 + BLIP's [DEC] and [ENC] tokens). bench.py builds it from this for its memory count.
IMAGEREWARD_CONFIG = dict(image_size=224, patch=16, vision_width=1024, vision_depth=24, vision_heads=16,
                          vision_mlp=4096, vocab=30524, max_positions=512, text_width=768, text_depth=12,
                          text_heads=12, text_mlp=3072, head=(1024, 128, 64, 16, 1))
# In the released file but not in the score: BLIP's contrastive projections (used by BLIP's image-text matching, not
# by ImageReward) and BERT's position_ids buffer (0..511, rebuilt here by torch.arange).
IMAGEREWARD_UNUSED = {"blip.vision_proj.weight", "blip.vision_proj.bias", "blip.text_proj.weight",
                      "blip.text_proj.bias", "blip.text_encoder.embeddings.position_ids"}


def multi_head_attention(q, k, v, heads, mask=None, divide=False):
    """softmax(q k^T / sqrt(d) + mask) v per head (Vaswani et al. 2017, arXiv:1706.03762). q (B, Lq, D), k and v
    (B, Lk, D) -> (B, Lq, D); mask: additive, broadcastable to (B, heads, Lq, Lk), or None.

    Written out rather than F.scaled_dot_product_attention, whose fused kernels reorder the sums: this is the
    official operators' order, so small test models match the official code to float32's last bits. timm's ViT
    multiplies the scores by d^-0.5, BLIP's BERT divides them by sqrt(d) (divide=True): the same in exact
    arithmetic, and bit for bit at the released models' d = 64."""
    split = lambda x: x.unflatten(-1, (heads, x.shape[-1] // heads)).transpose(1, 2)  # (B, L, D) -> (B, h, L, d)
    q, k, v = split(q), split(k), split(v)
    scores = q @ k.transpose(-2, -1)                                                     # (B, h, Lq, Lk)
    scores = scores / math.sqrt(q.shape[-1]) if divide else scores * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores + mask
    return (scores.softmax(dim=-1) @ v).transpose(1, 2).flatten(2)                       # (B, Lq, D)


class ViTBlock(nn.Module):
    """Pre-LN transformer block of BLIP's ViT (timm's Block): x + attn(LN(x)), then x + mlp(LN(x)), exact GELU."""

    def __init__(self, dim, heads, hidden):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = nn.ModuleDict(dict(qkv=nn.Linear(dim, 3 * dim), proj=nn.Linear(dim, dim)))
        self.mlp = nn.ModuleDict(dict(fc1=nn.Linear(dim, hidden), fc2=nn.Linear(hidden, dim)))

    def forward(self, x):                                                  # (B, N, D)
        # one qkv projection laid out [q of all heads | k | v], as timm's Attention reshapes it (B, N, 3, h, D/h)
        q, k, v = self.attn.qkv(self.norm1(x)).chunk(3, dim=-1)            # 3 x (B, N, D)
        x = x + self.attn.proj(multi_head_attention(q, k, v, self.heads))  # (B, N, D)
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))       # (B, N, D)


class BlipViT(nn.Module):
    """BLIP's image encoder (models/vit.py; Dosovitskiy et al. 2021, arXiv:2010.11929): pixels (B, 3, S, S) ->
    tokens (B, 1 + (S/patch)^2, D), the final LayerNorm applied to EVERY token (ImageReward reads them all)."""

    def __init__(self, image_size, patch, width, depth, heads, hidden):
        super().__init__()
        self.patch_embed = nn.ModuleDict(dict(proj=nn.Conv2d(3, width, patch, stride=patch)))  # timm's PatchEmbed
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, (image_size // patch) ** 2 + 1, width))
        self.blocks = nn.ModuleList(ViTBlock(width, heads, hidden) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6)

    def forward(self, pixels):                                             # (B, 3, 224, 224), CLIP-normalised
        x = self.patch_embed.proj(pixels).flatten(2).transpose(1, 2)       # (B, 196, D): 14 x 14 patches, row-major
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1)   # (B, 197, D)
        x = x + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)                                                # (B, 197, D)


def _bert_attention(m, x, context, heads, mask=None):
    """BERT's post-LN attention sub-layer (med.py BertAttention): LN(x + dense(attention(query(x), key(context),
    value(context)))). Self-attention with context = x; cross-attention with context = the image tokens."""
    s = m["self"]
    h = multi_head_attention(s.query(x), s.key(context), s.value(context), heads, mask, divide=True)  # (B, L, D)
    return m.output.LayerNorm(x + m.output.dense(h))


class BlipTextEncoder(nn.Module):
    """BLIP's image-grounded text encoder (med.py BertModel in 'multimodal' mode, no pooler): BERT embeddings (word +
    absolute position, no token types), then per layer self-attention over the prompt (padding masked),
    cross-attention to all image tokens, and BERT's feed-forward, each a post-LN residual (eps 1e-12)."""

    def __init__(self, vocab, max_positions, width, depth, heads, hidden, image_width):
        super().__init__()
        self.heads = heads
        ln = lambda: nn.LayerNorm(width, eps=1e-12)
        self.embeddings = nn.ModuleDict(dict(word_embeddings=nn.Embedding(vocab, width),
                                             position_embeddings=nn.Embedding(max_positions, width), LayerNorm=ln()))

        def attention(context_width):  # med.py BertAttention: .self (query, key, value) and .output (dense, LN)
            return nn.ModuleDict({"self": nn.ModuleDict(dict(query=nn.Linear(width, width),
                                                             key=nn.Linear(context_width, width),
                                                             value=nn.Linear(context_width, width))),
                                  "output": nn.ModuleDict(dict(dense=nn.Linear(width, width), LayerNorm=ln()))})
        layer = lambda: nn.ModuleDict(dict(attention=attention(width), crossattention=attention(image_width),
                                           intermediate=nn.ModuleDict(dict(dense=nn.Linear(width, hidden))),
                                           output=nn.ModuleDict(dict(dense=nn.Linear(hidden, width), LayerNorm=ln()))))
        self.encoder = nn.ModuleDict(dict(layer=nn.ModuleList(layer() for _ in range(depth))))

    def forward(self, input_ids, attention_mask, image_embeds):            # (B, L), (B, L), (B, N, Dv)
        e = self.embeddings
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)             # (L,): no host copy
        x = e.LayerNorm(e.word_embeddings(input_ids) + e.position_embeddings(positions))   # (B, L, D)
        # med.py's extended mask: 0 where a token is attended, -10000 (not -inf) on padding, whose softmax weight is
        # then exp(-10000) = 0 in float32. The image tokens are all visible (ImageReward passes a mask of ones).
        mask = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -10000.0             # (B, 1, 1, L)
        for layer in self.encoder.layer:
            x = _bert_attention(layer.attention, x, x, self.heads, mask)                   # (B, L, D)
            x = _bert_attention(layer.crossattention, x, image_embeds, self.heads)         # (B, L, D)
            h = F.gelu(layer.intermediate.dense(x))                                        # (B, L, hidden)
            x = layer.output.LayerNorm(x + layer.output.dense(h))                          # (B, L, D)
        return x


class ImageReward(nn.Module):
    """ImageReward (Xu et al. 2023, arXiv:2304.05977), the reward model of THUDM/ImageReward (ImageReward-v1.0).

    forward(pixel_values (B, 3, 224, 224) CLIP-normalised, input_ids (B, 35), attention_mask (B, 35)) -> (B,)
    normalised rewards (raw - 0.1672) / 1.0333, roughly N(0, 1) on generated images. Build it from the released
    ImageReward.pt with `from_state_dict` (sizes read off the tensors; the heads are arguments: shapes cannot say)."""

    def __init__(self, image_size, patch, vision_width, vision_depth, vision_heads, vision_mlp, vocab, max_positions,
                 text_width, text_depth, text_heads, text_mlp, head):
        super().__init__()
        self.image_size = image_size
        self.blip = nn.ModuleDict(dict(
            visual_encoder=BlipViT(image_size, patch, vision_width, vision_depth, vision_heads, vision_mlp),
            text_encoder=BlipTextEncoder(vocab, max_positions, text_width, text_depth, text_heads, text_mlp,
                                         vision_width)))
        # The head: Linear, Dropout(0.2), Linear, Dropout(0.2), Linear, Dropout(0.1), Linear, Linear (hence the
        # indices 0, 2, 4, 6, 7). The dropouts are identities here: a reward model is only ever evaluated, and an
        # accidental .train() must not make the RL reward random.
        w = (text_width, *head)
        self.mlp = nn.ModuleDict(dict(layers=nn.Sequential(
            nn.Linear(w[0], w[1]), nn.Identity(), nn.Linear(w[1], w[2]), nn.Identity(), nn.Linear(w[2], w[3]),
            nn.Identity(), nn.Linear(w[3], w[4]), nn.Linear(w[4], w[5]))))

    def encode(self, pixel_values, input_ids, attention_mask):
        """(image tokens (B, 197, Dv), text feature (B, Dt)): the text encoder's first ([CLS]) token, which has
        attended to the prompt and, through 12 cross-attentions, to every image token."""
        image_embeds = self.blip.visual_encoder(pixel_values)                               # (B, 197, Dv)
        text = self.blip.text_encoder(input_ids, attention_mask, image_embeds)              # (B, 35, Dt)
        return image_embeds, text[:, 0]                                                     # (B, Dt)

    def forward(self, pixel_values, input_ids, attention_mask):
        raw = self.mlp.layers(self.encode(pixel_values, input_ids, attention_mask)[1].float())[:, 0]  # (B,)
        return (raw - IMAGEREWARD_MEAN) / IMAGEREWARD_STD

    @staticmethod
    def config_of(state_dict, vision_heads=16, text_heads=12):
        """ImageReward's sizes read off a state dict in the released layout (KeyError naming a key it needs)."""
        sd, v, t = state_dict, "blip.visual_encoder.", "blip.text_encoder."
        # depth: 1 + the highest block index any key names (a block with a missing tensor is then a missing key)
        count = lambda pre: 1 + max([int(k[len(pre):].split(".")[0]) for k in sd if k.startswith(pre)], default=-1)
        patch = sd[v + "patch_embed.proj.weight"].shape[-1]
        grid = math.isqrt(sd[v + "pos_embed"].shape[1] - 1)                                # 197 = 1 + 14^2 tokens
        vocab, text_width = sd[t + "embeddings.word_embeddings.weight"].shape
        return dict(image_size=grid * patch, patch=patch, vision_width=sd[v + "cls_token"].shape[-1],
                    vision_depth=count(v + "blocks."), vision_heads=vision_heads,
                    vision_mlp=sd[v + "blocks.0.mlp.fc1.weight"].shape[0], vocab=vocab,
                    max_positions=sd[t + "embeddings.position_embeddings.weight"].shape[0], text_width=text_width,
                    text_depth=count(t + "encoder.layer."), text_heads=text_heads,
                    text_mlp=sd[t + "encoder.layer.0.intermediate.dense.weight"].shape[0],
                    head=tuple(sd[f"mlp.layers.{i}.weight"].shape[0] for i in (0, 2, 4, 6, 7)))

    @classmethod
    def from_state_dict(cls, state_dict, vision_heads=16, text_heads=12):
        """The model from a state dict in ImageReward.pt's layout, loaded strictly: a missing key, or one that is
        neither the model's nor among IMAGEREWARD_UNUSED, is a ValueError that names it. (The official loader uses
        strict=False, which would score with random weights wherever a key did not fit.)"""
        try:
            model = cls(**cls.config_of(state_dict, vision_heads, text_heads))
        except KeyError as e:
            raise ValueError(f"not an ImageReward state dict: missing key {e.args[0]!r}") from None
        expected = set(model.state_dict())
        missing = sorted(expected - set(state_dict))
        unexpected = sorted(set(state_dict) - expected - IMAGEREWARD_UNUSED)
        if missing or unexpected:
            what = (f"missing key {missing[0]!r}" if missing else f"unexpected key {unexpected[0]!r}")
            more = len(missing) + len(unexpected) - 1
            raise ValueError(f"ImageReward state dict does not fit: {what}" + (f" (and {more} more)" if more else ""))
        model.load_state_dict({k: state_dict[k] for k in expected}, strict=True)  # shapes checked here
        return model.eval().requires_grad_(False)


def imagereward_tokens(tokenizer, prompts):
    """(input_ids (P, 35), attention_mask (P, 35)) of prompts as ImageReward.score tokenises them: padded to and
    truncated at 35 tokens, ids as the tokenizer gives them ([CLS] first; BLIP's [DEC]/[ENC] tokens, which the
    official tokenizer adds, never occur in a prompt)."""
    enc = tokenizer(list(prompts), padding="max_length", truncation=True, max_length=IMAGEREWARD_TOKENS,
                    return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def imagereward_preprocess(image, size=224):
    """ImageReward's own transform of an image from disk (torchvision's Resize(224, BICUBIC) on a PIL image,
    CenterCrop(224), RGB, ToTensor, CLIP's mean/std), in PIL and torch: a PIL image -> (3, 224, 224) float.

    Exact to the official pipeline, roundings included: the long side is truncated (int(224 * long / short)), the
    crop offsets rounded half to even (Python's round). PIL's bicubic resamples the uint8 image with antialiasing."""
    w, h = image.size
    long = int(size * max(w, h) / min(w, h))
    new_w, new_h = (size, long) if w <= h else (long, size)
    image = image.resize((new_w, new_h), Image.BICUBIC)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    image = image.crop((left, top, left + size, top + size)).convert("RGB")  # convert after the crop, as official
    x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float() / 255  # (3, 224, 224) in [0, 1]
    mean, std = torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD)
    return (x - mean[:, None, None]) / std[:, None, None]


class ImageRewardScore(nn.Module):
    """ImageReward as a reward: images in [-1, 1] (B, 3, H, W) and class labels (B,) -> (B,), differentiable.

    The prompts (ImageNet's class names, as for PickScore) are tokenised once into buffers that move with .to(device);
    a batch looks its rows up by label on the labels' device, with no host copy in the step. Unlike PickScore, the
    text side cannot be precomputed: the text encoder cross-attends to the image. Images go through clip_preprocess,
    the differentiable twin of imagereward_preprocess (the same resize-crop-normalise; torch's antialiased bicubic is
    PIL's kernel, without PIL's rounding to uint8 after the resize)."""

    def __init__(self, model, input_ids, attention_mask):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.register_buffer("input_ids", input_ids, persistent=False)            # (P, 35)
        self.register_buffer("attention_mask", attention_mask, persistent=False)  # (P, 35)

    def score(self, pixel_values, labels):
        """Rewards (B,) of preprocessed images (B, 3, 224, 224) against their classes' prompts."""
        return self.model(pixel_values, self.input_ids[labels], self.attention_mask[labels])

    def forward(self, images, labels):
        return self.score(clip_preprocess(images, self.model.image_size), labels)


def load_imagereward(path, tokenizer_dir, prompts=None, vision_heads=16, text_heads=12):
    """ImageRewardScore from local files only: `path` the released ImageReward.pt (THUDM/ImageReward on the
    Hugging Face hub), `tokenizer_dir` a local bert-base-uncased folder (its vocab.txt, or a save_pretrained)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ImageReward weights {path!r} not found; ImageReward is never downloaded")
    if not os.path.isdir(tokenizer_dir):
        raise FileNotFoundError(f"{tokenizer_dir!r} is not a local bert-base-uncased folder; nothing is downloaded")
    from transformers import BertTokenizerFast
    tokenizer = BertTokenizerFast.from_pretrained(tokenizer_dir, local_files_only=True)
    model = ImageReward.from_state_dict(torch.load(path, map_location="cpu", weights_only=True), vision_heads,
                                        text_heads)
    input_ids, attention_mask = imagereward_tokens(tokenizer, prompts or imagenet_prompts())
    vocab = model.blip.text_encoder.embeddings.word_embeddings.num_embeddings
    if int(input_ids.max()) >= vocab:
        raise ValueError(f"the tokenizer in {tokenizer_dir!r} gives ids up to {int(input_ids.max())}, beyond the "
                         f"model's {vocab} embeddings: give bert-base-uncased's")
    return ImageRewardScore(model, input_ids, attention_mask)
