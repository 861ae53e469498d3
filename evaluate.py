"""Evaluation: FID, Inception Score, precision/recall, CLIP score, PickScore and ImageReward; and the toy evaluator.

Metrics (each function is self-contained and copyable):
  * FID: Frechet distance between Gaussian fits of Inception pool_3 features (Heusel et al. 2017, arXiv:1706.08500),
    float64 with scipy's sqrtm, as pytorch-fid and torch-fidelity compute it.
  * Inception Score exp(E_x KL(p(y|x) || p(y))) over 10 splits of the shuffled samples (Salimans et al. 2016), on
    the 1008 logits without the fc bias, as torch-fidelity (the pipeline MAR reports with) computes it.
  * Improved precision / recall with k = 3 (Kynkaanniemi et al. 2019) on the same features: fidelity and diversity,
    the open question for a distilled, reward-tuned generator.
  * The FID Inception v3 is built here (TF-2015 graph quirks included) and loads the standard weights file; images
    are uint8, resized to 299 with TensorFlow-1 bilinear semantics and mapped by (x - 128) / 128 (torch-fidelity).
    Tests check features and logits against pytorch-fid's and torch-fidelity's networks with the same weights.
  * CLIP score (open_clip, local weights), PickScore (transformers, local directories) and ImageReward (local
    ImageReward.pt and bert-base-uncased): the reward models of rewards.py, which rl_refine.py differentiates, each
    against its image's ImageNet class name, reported with a 95% confidence interval of the mean (`mean_ci95`).
    ImageReward reads the saved images through its own PIL transform (`rewards.imagereward_preprocess`), as its
    package scores files; CLIP and PickScore through the torch transform the RL reward uses.
  * The toy evaluator: a small CNN trained on the toy digits' training split plays Inception. Its 128-d features
    give the toy FID against the held-out split, its logits the toy IS and the class accuracy of generated digits.
    It is trained once (14 s on 2 CPU cores) and cached as a file.

Nothing is downloaded: every weights file is a local path.

    # ImageNet 256 (the files MAR's and ADM's evaluations use)
    python evaluate.py --samples samples/marval_h/samples.npz --ref-stats VIRTUAL_imagenet256_labeled.npz \
        --inception-weights pt_inception-2015-12-05-6726825d.pth --json fid.json
    # the text-image scores alone (MARVAL's RL table: CLIP score, ImageReward, PickScore), no FID
    python evaluate.py --samples samples/marval_h/samples.npz --pickscore-model PickScore_v1/ \
        --pickscore-processor CLIP-ViT-H-14/ --clip-model ViT-H-14 --clip-weights open_clip_vit_h14.bin \
        --imagereward-weights ImageReward.pt --imagereward-tokenizer bert-base-uncased/ --json rl_table.json
    # toy digits
    python evaluate.py --toy --samples samples/toy_student/samples.npz
"""
import argparse
import json
import os
import time
import zipfile

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from scipy import linalg

import common
import mar
from rewards import ClipReward, ImageRewardScore, PickScoreReward, imagereward_preprocess, load_imagereward

# ----------------------------------------------------------------------------------------------------------------
# Metrics on features / probabilities (copyable: numpy / torch only)
# ----------------------------------------------------------------------------------------------------------------


def feature_stats(feats):
    """(N, D) features -> (mu (D,), sigma (D, D)) in float64, sigma with the unbiased (N - 1) normalisation."""
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2 or len(feats) < 2:
        raise ValueError(f"need at least 2 feature vectors of shape (N, D) for statistics, got {feats.shape}")
    return feats.mean(0), np.cov(feats, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """FID (Heusel et al. 2017, arXiv:1706.08500, Eq. 6): ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), float64.

    If the product is singular, sqrtm is retried with eps added to both diagonals (as pytorch-fid does); a tiny
    imaginary part from numerical error is dropped, a large one is an error.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(s1.dot(s2))
    if not np.isfinite(covmean).all():
        offset = np.eye(len(s1)) * eps
        covmean = linalg.sqrtm((s1 + offset).dot(s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm has a large imaginary component {np.max(np.abs(covmean.imag)):.3g}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def inception_score(logits, splits=10, shuffle_seed=2020):
    """(mean, std) over `splits` chunks of exp(mean_x KL(p(y|x) || p(y))), p from softmax(logits) (Salimans et al.
    2016, arXiv:1606.03498).

    The samples are shuffled with a fixed seed before splitting, as torch-fidelity does (its default seed 2020):
    a folder stored by class (sample.py's images/{index}.png) would otherwise give each split a tenth of the classes
    and an IS near 1. shuffle_seed=None keeps the given order.
    """
    p = torch.as_tensor(logits, dtype=torch.float64).softmax(dim=1)
    if len(p) < splits:
        raise ValueError(f"{len(p)} samples cannot be split into {splits} parts for the Inception Score")
    n = len(p)
    if shuffle_seed is not None:  # numpy's permutation with torch-fidelity's seed: the same splits as its IS
        p = p[torch.from_numpy(np.random.RandomState(shuffle_seed).permutation(n))]
    scores = []
    for chunk in (p[i * n // splits: (i + 1) * n // splits] for i in range(splits)):  # split k: [kN/s, (k+1)N/s)
        py = chunk.mean(0, keepdim=True)
        kl = (chunk * (chunk.clamp_min(1e-12).log() - py.clamp_min(1e-12).log())).sum(1).mean()
        scores.append(kl.exp().item())
    return float(np.mean(scores)), float(np.std(scores))


def precision_recall(real, fake, k=3, batch=2000):
    """Improved precision and recall (Kynkaanniemi et al. 2019, arXiv:1904.06991) on features (N, D).

    Each sample's k-NN radius (k-th nearest neighbour within its own set, itself excluded) defines a ball; precision
    = share of fake samples inside some real ball (fidelity), recall = share of real samples inside some fake ball
    (diversity). Distances in batches, so 50k x 50k fits in memory.
    """
    real, fake = torch.as_tensor(real, dtype=torch.float32), torch.as_tensor(fake, dtype=torch.float32)
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples per set")

    def radii(x):  # (N,) distance to the k-th neighbour (index k: index 0 is the point itself)
        return torch.cat([torch.cdist(b, x).kthvalue(k + 1, dim=1).values for b in x.split(batch)])

    def covered(x, ref, ref_r):  # share of x inside at least one ball of ref
        return torch.cat([(torch.cdist(b, ref) <= ref_r[None]).any(1) for b in x.split(batch)]).float().mean().item()

    r_real, r_fake = radii(real), radii(fake)
    return covered(fake, real, r_real), covered(real, fake, r_fake)


def mean_ci95(values):
    """(mean, [lo, hi]) of per-image scores (N,): the 95% confidence interval of the mean, mean +- 1.96 s / sqrt(N)
    with s the sample standard deviation (N - 1). It says how far the mean could move with another draw of N images
    (other seeds), the resolution at which two models' scores differ: MARVAL's RL moves ImageReward by 0.03.
    The normal quantile 1.96 (not Student's t) assumes N in the hundreds or more; for N = 1 the interval is nan."""
    v = np.asarray(values, dtype=np.float64)
    mean, half = v.mean(), 1.959964 * v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else float("nan")
    return float(mean), [float(mean - half), float(mean + half)]


# ----------------------------------------------------------------------------------------------------------------
# The FID Inception v3 (TF 2015-12-05 graph, as converted for pytorch-fid / torch-fidelity) and its preprocessing
# ----------------------------------------------------------------------------------------------------------------


class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm (eps 1e-3, as TF) -> ReLU."""

    def __init__(self, cin, cout, **kw):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg3(x):
    # TF's average pool ignores the zero padding: count_include_pad=False (torchvision's default differs)
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):  # 35x35 blocks Mixed_5b/c/d: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(_avg3(x))], 1)


class InceptionB(nn.Module):  # Mixed_6a, 35 -> 17: stride-2 3x3 | 1x1-3x3-3x3(s2) | maxpool
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):  # 17x17 blocks Mixed_6b..e with factorised 1x7 / 7x1 convolutions
    def __init__(self, cin, c7):
        super().__init__()
        k17, k71 = dict(kernel_size=(1, 7), padding=(0, 3)), dict(kernel_size=(7, 1), padding=(3, 0))
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1, self.branch7x7_2 = BasicConv2d(cin, c7, kernel_size=1), BasicConv2d(c7, c7, **k17)
        self.branch7x7_3 = BasicConv2d(c7, 192, **k71)
        self.branch7x7dbl_1, self.branch7x7dbl_2 = BasicConv2d(cin, c7, kernel_size=1), BasicConv2d(c7, c7, **k71)
        self.branch7x7dbl_3, self.branch7x7dbl_4 = BasicConv2d(c7, c7, **k17), BasicConv2d(c7, c7, **k71)
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, **k17)
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        dbl = self.branch7x7dbl_2(self.branch7x7dbl_1(x))
        dbl = self.branch7x7dbl_5(self.branch7x7dbl_4(self.branch7x7dbl_3(dbl)))
        return torch.cat([self.branch1x1(x), self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))), dbl,
                          self.branch_pool(_avg3(x))], 1)


class InceptionD(nn.Module):  # Mixed_7a, 17 -> 8
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):  # 8x8 blocks Mixed_7b (avg pool branch) and Mixed_7c (MAX pool branch: a TF quirk)
    def __init__(self, cin, max_pool=False):
        super().__init__()
        k13, k31 = dict(kernel_size=(1, 3), padding=(0, 1)), dict(kernel_size=(3, 1), padding=(1, 0))
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a, self.branch3x3_2b = BasicConv2d(384, 384, **k13), BasicConv2d(384, 384, **k31)
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a, self.branch3x3dbl_3b = BasicConv2d(384, 384, **k13), BasicConv2d(384, 384, **k31)
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        d3 = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pool = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg3(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(d3), self.branch3x3dbl_3b(d3), self.branch_pool(pool)], 1)


def resize_bilinear_tf1(x, size):
    """Bilinear resize as TensorFlow 1.x's resize_bilinear(align_corners=False): source coordinate = dst * in/out
    (no half-pixel shift, unlike torch's F.interpolate). x (B, C, H, W) float -> (B, C, size, size)."""
    def axis(n_in):
        src = torch.arange(size, dtype=torch.float64, device=x.device) * (n_in / size)
        i0 = src.floor().long().clamp(max=n_in - 1)
        return i0, (i0 + 1).clamp(max=n_in - 1), (src - i0).to(x.dtype)

    y0, y1, fy = axis(x.shape[2])
    x0, x1, fx = axis(x.shape[3])
    top, bottom = x[:, :, y0], x[:, :, y1]                       # (B, C, size, W)
    top = top[..., x0] + (top[..., x1] - top[..., x0]) * fx      # horizontal lerp first, as TF does
    bottom = bottom[..., x0] + (bottom[..., x1] - bottom[..., x0]) * fx
    return top + (bottom - top) * fy[:, None]                    # (B, C, size, size)


class FIDInception(nn.Module):
    """Inception v3 of the FID (Heusel et al. 2017) with the TF 2015-12-05 weights' layout (1008 classes).

    forward(uint8 images (B, 3, H, W)) -> (pool features (B, 2048), unbiased logits (B, 1008)). Preprocessing as
    torch-fidelity (the pipeline MAR reports FID with): TF1-compatible bilinear resize to 299, (x - 128) / 128.
    IS uses the logits WITHOUT the fc bias, as torch-fidelity does.
    """

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = InceptionA(192, 32), InceptionA(256, 64), InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b, self.Mixed_6c = InceptionC(768, 128), InceptionC(768, 160)
        self.Mixed_6d, self.Mixed_6e = InceptionC(768, 160), InceptionC(768, 192)
        self.Mixed_7a, self.Mixed_7b, self.Mixed_7c = InceptionD(768), InceptionE(1280), InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)

    def features(self, x):
        """Normalised (B, 3, 299, 299) input -> (B, 2048) pool_3 features."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))    # (B, 64, 147, 147)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, stride=2)))  # (B, 192, 71, 71)
        x = F.max_pool2d(x, 3, stride=2)                                      # (B, 192, 35, 35)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, "Mixed_" + name)(x)                             # ... -> (B, 2048, 8, 8)
        return x.mean(dim=(2, 3))                                             # (B, 2048)

    def forward(self, images):
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"FIDInception takes uint8 images (B, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        x = (resize_bilinear_tf1(images.float(), 299) - 128) / 128
        feats = self.features(x)
        return feats, feats @ self.fc.weight.T


def load_inception(path):
    """The FID Inception from a local weights file (pytorch-fid's pt_inception-2015-12-05-6726825d.pth or
    torch-fidelity's weights-inception-2015-12-05-6726825d.pth: the same layout). BatchNorm's num_batches_tracked
    counters and AuxLogits (unused) may be absent or present; everything else must fit exactly."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Inception weights {path!r} not found. Nothing is downloaded: get pt_inception-2015-12-05-6726825d.pth "
            "(the pytorch-fid release) or torch-fidelity's weights-inception-2015-12-05-6726825d.pth and pass the "
            "local path with --inception-weights")
    sd = mar.read_checkpoint(path)
    sd = {k: v for k, v in sd.items() if "num_batches_tracked" not in k and not k.startswith("AuxLogits.")}
    model = FIDInception()
    sd.update({k: v for k, v in model.state_dict().items() if "num_batches_tracked" in k})
    mar.load_state_dict_strict(model, sd, f"Inception weights {path!r}",  # names the keys that do not fit
                               "Give pt_inception-2015-12-05-6726825d.pth (pytorch-fid / torch-fidelity)")
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------------------------
# Toy evaluator
# ----------------------------------------------------------------------------------------------------------------


# The toy's "Inception": FID needs a feature space in which realistic images cluster; for 16x16 digits a small CNN
# trained to classify them gives one. It is trained only on the training split, so the held-out digits it serves as
# reference statistics for were never seen. Its logits double as the toy IS and as the RL reward (log p(digit)).
class ToyClassifier(nn.Module):
    """Small CNN on (B, 1, 16, 16) digits in [-1, 1]: `features` (B, 128) for FID, `forward` logits (B, 10).
    kind "mlp": a pixel MLP instead, the independent evaluator of experiments.py (another architecture and seed
    than the reward's classifier, so reward hacking of the CNN does not carry over for free)."""

    def __init__(self, kind="cnn"):
        super().__init__()
        self.kind = kind
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.GELU(), nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.GELU(),  # 8x8
            nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()      # 128
        ) if kind == "cnn" else nn.Sequential(nn.Flatten(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 128),
                                              nn.GELU())                                                    # 128
        self.head = nn.Linear(128, 10)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.body(x))


@torch.enable_grad()  # callers may be inside no_grad (evaluation code)
def train_toy_classifier(steps=1500, seed=0, verbose=True, kind="cnn"):
    """Train on the training split with random +-1 pixel shifts; report held-out accuracy (98.0% with seed 0)."""
    from data import toy_digits
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x, y = toy_digits("train")
    model = ToyClassifier(kind)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    for step in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=g)
        shift = torch.randint(-1, 2, (2,), generator=g).tolist()
        xb = torch.roll(x[idx], shifts=shift, dims=(2, 3))  # small translation augmentation
        loss = F.cross_entropy(model(xb), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    xh, yh = toy_digits("heldout")
    with torch.no_grad():
        acc = (model(xh).argmax(1) == yh).float().mean().item()
    if verbose:
        common.print0(f"toy classifier: held-out accuracy {acc:.3f}")
    return model, acc


def load_toy_classifier(path="runs/toy_classifier.pt", kind="cnn", seed=0):
    """The cached toy classifier, trained and saved (atomically) on first use (`kind`, `seed`: what to train then;
    a saved file says its own kind)."""
    if os.path.exists(path):
        ck = mar.read_checkpoint(path)
        model = ToyClassifier(ck.get("kind", "cnn"))
        mar.load_state_dict_strict(model, ck["model"], f"toy classifier {path!r}",
                                   "It is a cache: delete it, or give another --classifier, to train a new one")
        return model.eval()
    model, acc = train_toy_classifier(seed=seed, kind=kind)
    common.save_checkpoint(path, {"model": model.state_dict(), "heldout_accuracy": acc, "kind": kind})
    return model


class ToyEvaluator:
    """Toy FID / IS / accuracy of generated digits (N, 1, 16, 16) in [-1, 1] against the held-out split."""

    def __init__(self, classifier_path="runs/toy_classifier.pt", kind="cnn", seed=0):
        from data import toy_digits
        self.net = load_toy_classifier(classifier_path, kind, seed)
        self.ref_feats = self.features(toy_digits("heldout")[0])                     # (397, 128)
        self.ref_mu, self.ref_sigma = feature_stats(self.ref_feats)
        x, y = toy_digits("train")
        train = self.features(x)                                                     # (1400, 128)
        self.train_stats = feature_stats(train)
        self.train_feats = train
        self.train_by_class = [torch.nonzero(y == c)[:, 0] for c in range(10)]       # 10 index tensors, one per digit
        # class prototypes: the unit-normalised mean training feature of each digit (the CLIP-score analogue)
        self.prototypes = F.normalize(torch.stack([torch.from_numpy(train[idx.numpy()]).mean(0)
                                                   for idx in self.train_by_class]), dim=1)  # (10, 128)

    @torch.no_grad()
    def features(self, x):
        """Classifier features (N, 128) as numpy: the toy's Inception pool features (FID, precision/recall)."""
        return torch.cat([self.net.features(b.float().cpu()) for b in x.split(500)]).numpy()

    def real_split_fid(self):
        """FID between all 1,400 training digits and the held-out split (3.31 with the default classifier)."""
        return frechet_distance(*self.train_stats, self.ref_mu, self.ref_sigma)

    def real_floor(self, n, draws=10, seed=0):
        """The floor at the measurements' own size: mean FID of n class-balanced real training digits (n / 10 per
        class, as the generated sets' labels cycle 0..9) against the held-out split, over `draws` random subsets.

        FID is biased upwards by the sample covariance's noise, more for fewer samples: 400 real digits score 4.93,
        all 1,400 score 3.31. A generator's 400-digit FID is compared with the 400-digit floor, which is what a
        generator that drew perfect digits from the training distribution would score."""
        if n % 10:
            raise ValueError(f"real_floor needs a multiple of 10 digits (class-balanced), got {n}")
        if n // 10 > min(len(c) for c in self.train_by_class):
            raise ValueError(f"real_floor: {n} digits need {n // 10} per class, more than the training split has")
        g = torch.Generator().manual_seed(seed)
        fids = []
        for _ in range(draws):
            idx = torch.cat([c[torch.randperm(len(c), generator=g)[: n // 10]] for c in self.train_by_class])
            fids.append(frechet_distance(*feature_stats(self.train_feats[idx.numpy()]), self.ref_mu, self.ref_sigma))
        return float(np.mean(fids))

    @torch.no_grad()
    def __call__(self, images, labels):
        images = images.float().cpu().clamp(-1, 1)
        feats = self.features(images)
        logits = self.net.head(torch.from_numpy(feats))
        return {"toy_fid": frechet_distance(*feature_stats(feats), self.ref_mu, self.ref_sigma),
                "toy_is": inception_score(logits, splits=10)[0],
                "accuracy": (logits.argmax(1) == labels.cpu()).float().mean().item(),
                "out_of_range": (images.abs() >= 0.999).float().mean().item()}  # saturated pixels

    @torch.no_grad()
    def similarity(self, images, labels):
        """Cosine similarity of each image's features to its class's prototype (B,): a second, softer reward, the
        toy's CLIP score (image-prompt similarity) beside log p, its PickScore."""
        feats = torch.from_numpy(self.features(images.clamp(-1, 1)))
        return (F.normalize(feats, dim=1) * self.prototypes[labels.cpu()]).sum(1)

    def log_prob(self, images, labels):
        """Differentiable reward: log p(requested digit | image) under the classifier (B,). The decoded image is
        clamped to [-1, 1] first, as the evaluator and the saved PNGs see it (clip_preprocess does the same)."""
        return self.net.to(images.device)(images.clamp(-1, 1)).log_softmax(1).gather(1, labels[:, None])[:, 0]


TOY_BATCH = 200  # images per sampling call in sample_toy


@torch.no_grad()
def sample_toy(model, tokenizer, n, num_iter=4, cfg=1.0, one_step=False, seed=0):
    """n toy digits, labels 0, 1, ..., 9, 0, ... in batches of TOY_BATCH, batch i from generator seed + i, by the
    teacher's reverse diffusion (x0 clipped to the latents' range, tokenizer.x0_bound) or the one-step head, decoded
    by `tokenizer` (the toy VAE). Returns (images (n, 1, 16, 16), labels (n,), seconds per image, decoding included
    as on ImageNet).

    Under torchrun every rank must call it: rank r samples the batches i with i mod world == r and every rank gets
    all n images back (`common.gather_indexed`), the same images as one process makes."""
    was_training, device = model.training, model.fake_latent.device
    labels = torch.arange(n, device=device) % 10
    batches = labels.split(TOY_BATCH)
    head = mar.HeadSampler(one_step=one_step, clip=tokenizer.x0_bound)
    sample = lambda i, lb: model.sample_tokens(len(lb), num_iter=num_iter, cfg=cfg, labels=lb, head=head,
                                               generator=torch.Generator(device).manual_seed(seed + i))
    try:
        model.eval()
        t0, mine = time.time(), {}
        for i in common.my_share(len(batches)):
            mine[i] = tokenizer.decode(sample(i, batches[i]))
        if device.type == "cuda":
            torch.cuda.synchronize()  # the kernels' work, not their launches
        sec = (time.time() - t0) / max(1, sum(len(x) for x in mine.values()))
    finally:
        model.train(was_training)
    return common.gather_indexed(mine).to(device), labels, sec


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------


# The command line reads what sample.py writes (or any ADM-format file), checks it, and reports each metric for which
# the needed local files were given.
def open_npz(path, what):
    """np.load without pickles, with an error that says what the file should be (a garbage file otherwise gets
    numpy's "Object arrays cannot be loaded when allow_pickle=False")."""
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path!r} is not an ADM .npz ({what}): {type(e).__name__}: {str(e)[:120]}") from e


def load_samples(path):
    """uint8 (N, H, W, C) and labels (or None) from an ADM-style .npz or a folder of PNGs."""
    if os.path.isdir(path):
        files = sorted(f for f in os.listdir(path) if f.lower().endswith(".png"))
        if not files:
            raise ValueError(f"no .png files in {path!r}")
        arrays = []
        for f in files:
            try:
                arrays.append(np.array(Image.open(os.path.join(path, f))))
            except OSError as e:  # truncated or not a PNG: name the file
                raise ValueError(f"cannot read {os.path.join(path, f)!r} ({e})") from None
        arr, labels = np.stack(arrays), None
    else:
        with open_npz(path, "samples: arr_0 uint8 (N, H, W, 3) [+ labels]") as d:
            if "arr_0" not in d:
                raise ValueError(f"{path!r} has no 'arr_0' (expected the ADM format: uint8 (N, H, W, 3))")
            arr, labels = d["arr_0"], (d["labels"] if "labels" in d else None)
    # Floats would be silently rescaled differently by every tool; ADM's evaluator and torch-fidelity take uint8.
    if arr.dtype != np.uint8:
        lo, hi = (arr.min(), arr.max()) if arr.size else (0, 0)
        raise ValueError(f"samples must be uint8 in [0, 255], got {arr.dtype} with values from {lo:.4g} to {hi:.4g} "
                         "(save rounded uint8, not floats)")
    arr = arr[..., None] if arr.ndim == 3 else arr
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3):
        raise ValueError(f"samples must be (N, H, W, 3) or (N, H, W, 1), got {arr.shape}")
    if len(arr) and arr.max() == 1:  # 0s and 1s only (all-black images are possible samples; this is not)
        raise ValueError("every value is 0 or 1: images in [0, 1] saved as uint8? save (x * 255).round() as uint8")
    if labels is not None and (labels.shape != (len(arr),) or not np.issubdtype(labels.dtype, np.integer)):
        raise ValueError(f"'labels' is {labels.dtype} {labels.shape} for {len(arr)} images: give one integer class "
                         "per image")
    return arr, labels


def reference_stats(path, inception, device, batch, image_shape=None):
    """(mu, sigma, features or None) from a reference .npz: ADM's mu/sigma if present, else computed from arr_0;
    features (for precision/recall) whenever arr_0 is there. With `image_shape` (H, W, C) of the samples, a reference
    batch of another image size is an error (FID at 256 against 512 statistics is meaningless)."""
    with open_npz(path, "reference batch: mu + sigma, or arr_0") as d:
        keys = set(d.files)
        if not ({"mu", "sigma"} <= keys or "arr_0" in keys):
            raise ValueError(f"reference {path!r} has neither mu/sigma nor arr_0")
        if image_shape is not None and "arr_0" in keys and d["arr_0"].shape[1:3] != tuple(image_shape[:2]):
            raise ValueError(f"samples are {tuple(image_shape[:2])} images but the reference batch {path!r} holds "
                             f"{d['arr_0'].shape[1:3]}: sample at the reference's resolution")
        if "mu" in keys and d["mu"].shape != (2048,):
            raise ValueError(f"reference mu has shape {d['mu'].shape}; expected (2048,) Inception pool_3 statistics")
        feats = inception_features(d["arr_0"], inception, device, batch)[0] if "arr_0" in keys else None
        if {"mu", "sigma"} <= keys:
            return d["mu"], d["sigma"], feats
    return (*feature_stats(feats), feats)


@torch.no_grad()
def inception_features(arr, inception, device, batch=50):
    """uint8 (N, H, W, C) -> pool features (N, 2048) float64 and unbiased logits (N, 1008)."""
    feats, logits = [], []
    for i in range(0, len(arr), batch):
        x = torch.from_numpy(arr[i: i + batch]).permute(0, 3, 1, 2)
        x = x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x
        f, l = inception(x.to(device))
        feats.append(f.double().cpu())
        logits.append(l.double().cpu())
    return torch.cat(feats).numpy(), torch.cat(logits)


def main(argv=None):
    """Parse the flags, load the samples, compute the metrics that the given files allow, print and save them."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", required=True, help="ADM-format .npz (arr_0 uint8 NHWC [+ labels]) or a PNG folder")
    p.add_argument("--toy", action="store_true", help="toy digits: toy FID / IS / accuracy with the toy classifier")
    p.add_argument("--classifier", default="runs/toy_classifier.pt", help="toy classifier cache (trained if absent)")
    p.add_argument("--ref-stats", default=None, help="reference .npz (ADM's VIRTUAL_imagenet256_labeled.npz)")
    p.add_argument("--inception-weights", default=None, help="local pt_inception-2015-12-05-6726825d.pth")
    p.add_argument("--clip-model", default=None, help="open_clip architecture name for the CLIP score, e.g. ViT-H-14")
    p.add_argument("--clip-weights", default=None, help="local open_clip weights file")
    p.add_argument("--pickscore-model", default=None, help="local directory of yuvalkirstain/PickScore_v1")
    p.add_argument("--pickscore-processor", default=None, help="local dir of laion/CLIP-ViT-H-14-laion2B-s32B-b79K")
    p.add_argument("--imagereward-weights", default=None, help="local ImageReward.pt (THUDM/ImageReward)")
    p.add_argument("--imagereward-tokenizer", default=None, help="local bert-base-uncased folder (its tokenizer)")
    p.add_argument("--batch-size", type=common.COUNT, default=50)
    p.add_argument("--device", type=common.device_arg, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None, help="write the numbers here")
    args = p.parse_args(argv)
    if bool(args.clip_model) != bool(args.clip_weights):
        p.error("the CLIP score needs both --clip-model (an open_clip architecture) and --clip-weights (its file)")
    if bool(args.imagereward_weights) != bool(args.imagereward_tokenizer):
        p.error("ImageReward needs both --imagereward-weights (ImageReward.pt) and --imagereward-tokenizer "
                "(a local bert-base-uncased folder)")
    text_image = args.clip_model or args.pickscore_model or args.imagereward_weights
    if bool(args.ref_stats) != bool(args.inception_weights) or not (args.toy or args.ref_stats or text_image):
        p.error("FID / IS need --ref-stats and --inception-weights (or --toy for the toy digits); the text-image "
                "scores alone need only their own files (--clip-*, --pickscore-*, --imagereward-*)")
    # Every input is read and checked before the first metric is computed.
    if not os.path.exists(args.samples):
        raise common.UsageError(f"--samples {args.samples}: no such file or folder; give sample.py's samples.npz "
                                "or a folder of PNGs")
    common.check_outputs([("--json", args.json)], [(f, getattr(args, f[2:].replace("-", "_"))) for f in (
        "--samples", "--ref-stats", "--inception-weights", "--clip-weights", "--imagereward-weights", "--classifier")])
    with common.reading("--samples", args.samples):
        arr, labels = load_samples(args.samples)
    out = {"samples": args.samples, "num_images": len(arr)}
    if labels is None and (args.toy or text_image):
        raise common.UsageError(f"--samples {args.samples} holds no class labels, which --toy and the text-image "
                                "scores need: give the samples.npz that sample.py writes")
    classes = 10 if args.toy else 1000  # the toy's digits; ImageNet's classes, whose names are the prompts
    if labels is not None and len(labels) and not 0 <= labels.min() <= labels.max() < classes:
        raise common.UsageError(f"--samples {args.samples}: labels from {labels.min()} to {labels.max()}, outside the "
                                f"{classes} classes {'of the toy' if args.toy else 'of ImageNet'}")
    if args.imagereward_weights:  # cheap checks before the expensive loads
        common.input_path("--imagereward-weights", args.imagereward_weights, "the released ImageReward.pt")
        common.input_path("--imagereward-tokenizer", args.imagereward_tokenizer, "a local bert-base-uncased folder",
                          folder=True)
    scorers = {}
    if args.pickscore_model:
        processor = args.pickscore_processor or args.pickscore_model
        with common.reading("--pickscore-model", args.pickscore_model):
            scorers["pickscore"] = PickScoreReward.from_dirs(args.pickscore_model, processor)
    if args.clip_model:
        with common.reading("--clip-weights", args.clip_weights):
            scorers["clip_score"] = ClipReward(args.clip_model, args.clip_weights)
    if args.imagereward_weights:
        with common.reading("--imagereward-weights", args.imagereward_weights):
            scorers["imagereward"] = load_imagereward(args.imagereward_weights, args.imagereward_tokenizer)
    if args.toy:
        if arr.shape[1:3] != (16, 16):
            raise common.UsageError(f"--toy scores 16 x 16 digits; --samples {args.samples} holds "
                                    f"{arr.shape[1]} x {arr.shape[2]} images (drop --toy for ImageNet samples)")
        x = torch.from_numpy(arr[..., :1]).permute(0, 3, 1, 2).float() / 127.5 - 1  # (N, 1, 16, 16)
        with common.reading("--classifier", args.classifier):
            ev = ToyEvaluator(args.classifier)
        out.update(ev(x, torch.from_numpy(labels).long()), real_split_fid=ev.real_split_fid())
    elif args.ref_stats:
        if len(arr) < 10:
            raise common.UsageError(f"--samples {args.samples} holds {len(arr)} images, too few for FID / IS "
                                    "(10 splits); FID-50K uses 50,000")
        common.input_path("--inception-weights", args.inception_weights, "pt_inception-2015-12-05-6726825d.pth")
        common.input_path("--ref-stats", args.ref_stats, "ADM's reference batch (VIRTUAL_imagenet256_labeled.npz)")
        with common.reading("--inception-weights", args.inception_weights):
            inception = load_inception(args.inception_weights).to(args.device)
        with common.reading("--ref-stats", args.ref_stats):
            mu_r, sigma_r, ref_feats = reference_stats(args.ref_stats, inception, args.device, args.batch_size,
                                                       arr.shape[1:])
        feats, logits = inception_features(arr, inception, args.device, args.batch_size)
        out["fid"] = frechet_distance(*feature_stats(feats), mu_r, sigma_r)
        out["inception_score"], out["inception_score_std"] = inception_score(logits, splits=10)
        if ref_feats is not None:
            out["precision"], out["recall"] = precision_recall(ref_feats, feats, k=3)
    for name, fn in scorers.items():
        out[name], out[name + "_ci95"] = mean_ci95(text_image_scores(fn, arr, labels, args.device, args.batch_size))
    return print_and_save(out, args.json)


@torch.no_grad()
def text_image_scores(fn, arr, labels, device, batch=50):
    """Per-image scores (N,) of uint8 images (N, H, W, C) against their classes' prompts. ImageReward (a
    rewards.ImageRewardScore) sees the images through its own PIL transform, as its package scores image files; the
    other scores through the differentiable torch transform of the reward, from [-1, 1]."""
    fn, vals = fn.to(device), []
    for i in range(0, len(arr), batch):
        a, y = arr[i: i + batch], torch.from_numpy(labels[i: i + batch]).long().to(device)
        if isinstance(fn, ImageRewardScore):  # PIL's bicubic resize and crop of each saved image, CLIP's mean/std
            rgb = [Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im) for im in a]
            x = torch.stack([imagereward_preprocess(im, fn.model.image_size) for im in rgb])  # (b, 3, 224, 224)
            vals.append(fn.score(x.to(device), y).float().cpu())
        else:
            x = torch.from_numpy(a).permute(0, 3, 1, 2).float() / 127.5 - 1                   # (b, C, H, W)
            vals.append(fn(x.to(device), y).float().cpu())
    return torch.cat(vals).numpy()


def print_and_save(out, json_path=None):
    """One line per number and per interval (k_ci95; other nested tables skipped), and the whole dict as JSON when a
    path is given."""
    for k, v in out.items():
        if k.endswith("_ci95"):
            print(f"{k:28s} [{v[0]:.4g}, {v[1]:.4g}]")
        elif not isinstance(v, (list, dict)):
            print(f"{k:28s} {v:.4g}" if isinstance(v, float) else f"{k:28s} {v}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    common.cli(main)
