"""Evaluation: FID and Inception Score, and the toy evaluator.

Metrics:
  * Frechet distance between Gaussian fits of features (Heusel et al. 2017, arXiv:1706.08500, Eq. 6), in float64
    with scipy's sqrtm, as pytorch-fid and torch-fidelity compute it.
  * Inception Score exp(E_x KL(p(y|x) || p(y))) over 10 splits (Salimans et al. 2016, arXiv:1606.03498).
  * The toy evaluator: a small CNN trained on the toy digits' training split plays Inception. Its 128-d penultimate
    features give the toy FID (against the held-out split's statistics), its logits give the toy IS and the class
    accuracy of generated digits (does the digit look like the requested class?). It is trained once (~20 s on a
    CPU) and cached as a file.

Commands:
    python evaluate.py --toy --samples samples/toy.npz --json toy_metrics.json     # toy FID / IS / accuracy
"""
import argparse
import json
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy import linalg

import mar

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
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), float64.

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


def inception_score(logits, splits=10):
    """(mean, std) over `splits` consecutive chunks of exp(mean_x KL(p(y|x) || p(y))), p from softmax(logits)."""
    p = torch.as_tensor(logits, dtype=torch.float64).softmax(dim=1)
    if len(p) < splits:
        raise ValueError(f"{len(p)} samples cannot be split into {splits} parts for the Inception Score")
    scores = []
    for chunk in p.chunk(splits):
        py = chunk.mean(0, keepdim=True)
        kl = (chunk * (chunk.clamp_min(1e-12).log() - py.clamp_min(1e-12).log())).sum(1).mean()
        scores.append(kl.exp().item())
    return float(np.mean(scores)), float(np.std(scores))


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
        self.branch5x5_1, self.branch5x5_2 = BasicConv2d(cin, 48, kernel_size=1), BasicConv2d(48, 64, kernel_size=5, padding=2)
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
        self.branch3x3_1, self.branch3x3_2 = BasicConv2d(cin, 192, kernel_size=1), BasicConv2d(192, 320, kernel_size=3, stride=2)
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
    mar.load_state_dict_strict(model, sd, f"Inception weights {path!r}")  # names the keys that do not fit
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------------------------
# Toy evaluator
# ----------------------------------------------------------------------------------------------------------------


class ToyClassifier(nn.Module):
    """Small CNN on (B, 1, 16, 16) digits in [-1, 1]: `features` (B, 128) for FID, `forward` logits (B, 10)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.GELU(), nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.GELU(),  # 8x8
            nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())     # 128
        self.head = nn.Linear(128, 10)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.body(x))


@torch.enable_grad()  # callers may be inside no_grad (evaluation code)
def train_toy_classifier(steps=1500, seed=0, verbose=True):
    """Train on the training split with random +-1 pixel shifts; report held-out accuracy (~96-98%)."""
    from data import toy_digits
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x, y = toy_digits("train")
    model = ToyClassifier()
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
        mar.print0(f"toy classifier: held-out accuracy {acc:.3f}")
    return model, acc


def load_toy_classifier(path="runs/toy_classifier.pt"):
    """The cached toy classifier, trained and saved (atomically) on first use."""
    model = ToyClassifier()
    if os.path.exists(path):
        mar.load_state_dict_strict(model, mar.read_checkpoint(path)["model"], f"toy classifier {path!r}")
        return model.eval()
    model, acc = train_toy_classifier()
    mar.save_checkpoint(path, {"model": model.state_dict(), "heldout_accuracy": acc})
    return model


class ToyEvaluator:
    """Toy FID / IS / accuracy of generated digits (N, 1, 16, 16) in [-1, 1] against the held-out split."""

    def __init__(self, classifier_path="runs/toy_classifier.pt"):
        from data import toy_digits
        self.net = load_toy_classifier(classifier_path)
        self.ref_mu, self.ref_sigma = feature_stats(self._features(toy_digits("heldout")[0]))
        self.train_stats = feature_stats(self._features(toy_digits("train")[0]))

    @torch.no_grad()
    def _features(self, x):
        return torch.cat([self.net.features(b.float().cpu()) for b in x.split(500)]).numpy()

    def real_split_fid(self):
        """FID between the training and held-out real digits: the floor a generator can hope for."""
        return frechet_distance(*self.train_stats, self.ref_mu, self.ref_sigma)

    @torch.no_grad()
    def __call__(self, images, labels):
        images = images.float().cpu().clamp(-1, 1)
        feats = self._features(images)
        logits = self.net.head(torch.from_numpy(feats))
        return {"toy_fid": frechet_distance(*feature_stats(feats), self.ref_mu, self.ref_sigma),
                "toy_is": inception_score(logits, splits=10)[0],
                "accuracy": (logits.argmax(1) == labels.cpu()).float().mean().item(),
                "out_of_range": (images.abs() >= 0.999).float().mean().item()}  # saturated pixels

    def log_prob(self, images, labels):
        """Differentiable reward: log p(requested digit | image) under the classifier (B,)."""
        return self.net.to(images.device)(images).log_softmax(1).gather(1, labels[:, None])[:, 0]


@torch.no_grad()
def sample_toy(model, n, num_iter=4, cfg=1.0, one_step=False, seed=0, batch=200, num_diffusion_steps=None):
    """n toy digits, labels 0, 1, ..., 9, 0, ... in batches of `batch`, batch i from generator seed + i, x0 clipped
    to the pixel range. Returns (images (n, 1, 16, 16), labels (n,), seconds per image)."""
    was_training = model.training
    model.eval()
    device = model.fake_latent.device
    labels = torch.arange(n, device=device) % 10
    t0 = time.time()
    images = torch.cat([model.sample_tokens(len(lb), num_iter=num_iter, cfg=cfg, labels=lb, one_step=one_step,
                                            num_diffusion_steps=num_diffusion_steps, clip_denoised=True,
                                            generator=torch.Generator(device).manual_seed(seed + i))
                        for i, lb in enumerate(labels.split(batch))])
    sec = (time.time() - t0) / n
    model.train(was_training)
    return images, labels, sec


def save_class_grid(images, labels, path, per_class=10, zoom=3):
    """PNG grid, one row per class (the first `per_class` images of each)."""
    from data import make_grid
    rows = torch.cat([images[labels == k][:per_class] for k in range(int(labels.max()) + 1)])
    im = make_grid(rows, per_class)
    im.resize((im.width * zoom, im.height * zoom), resample=0).save(path)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--toy", action="store_true", help="evaluate toy digits with the toy classifier")
    p.add_argument("--samples", required=True, help=".npz with arr_0 (N, H, W[, C]) uint8 and labels")
    p.add_argument("--classifier", default="runs/toy_classifier.pt", help="toy classifier cache (trained if absent)")
    p.add_argument("--json", default=None, help="write the numbers here")
    args = p.parse_args()
    if not args.toy:
        raise SystemExit("only --toy is implemented so far")
    with np.load(args.samples) as d:
        arr, labels = d["arr_0"], torch.from_numpy(d["labels"]).long()
    x = torch.from_numpy(arr).float()
    x = (x[..., :1] if x.ndim == 4 else x[..., None]).permute(0, 3, 1, 2) / 127.5 - 1  # (N, 1, 16, 16)
    ev = ToyEvaluator(args.classifier)
    out = dict(ev(x, labels), real_split_fid=ev.real_split_fid(), num_images=len(x))
    for k, v in out.items():
        print(f"{k:16s} {v:.4f}" if isinstance(v, float) else f"{k:16s} {v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
