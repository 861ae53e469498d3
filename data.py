"""Data: ImageNet class folders, cached VAE latents, and the bundled toy digits.

Three sources feed the same MAR code:

1. ImageNet (or any class-folder dataset): `ImageFolder` reads `root/<class>/<image>` with PIL, applies ADM's center
   crop to 256 and a random horizontal flip (training), and returns images in [-1, 1]. The training scripts encode
   them with the KL-16 VAE on the fly (`Tokenizer`).
2. Cached latents (MAR's `main_cache.py`): `python data.py cache ...` encodes every image AND its mirror image once
   and stores the posterior moments (mean and log-variance, 32x16x16); `CachedLatents` returns one of the two at
   random, and training samples a fresh latent from it every epoch. About 2x faster training per GPU (MAR #44).
3. The toy problem: scikit-learn's bundled handwritten digits (1,797 images of 8x8, 10 classes, no download),
   upsampled to 16x16 and scaled to [-1, 1]. A small KL autoencoder (vae.ToyVAE, trained in ~40 s and cached)
   stands in for KL-16: a digit becomes 4x4 latents of 16 channels, 16 tokens of KL-16's width 16, and every stage
   runs the ImageNet pipeline unchanged (encode, generate latents, decode) on a CPU in minutes.

Commands (the cache is resumable: the same command again skips every image already cached):
    python data.py cache --data-path IMAGENET/train --vae kl16.ckpt --out-dir cache/       # 1 GPU
    torchrun --nproc_per_node=8 data.py cache --data-path IMAGENET/train --vae kl16.ckpt --out-dir cache/
    python data.py toy-grid --out toy_real.png                                               # look at the toy data
"""
import argparse
import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import common
import figures
import mar

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".webp")  # matched in any case

# ----------------------------------------------------------------------------------------------------------------
# ImageNet: class folders, ADM center crop
# ----------------------------------------------------------------------------------------------------------------


def center_crop_arr(pil_image, image_size):
    """ADM's center crop (Dhariwal & Nichol 2021): halve with a BOX filter while the short side is >= 2x the target,
    resize with BICUBIC so the short side equals the target, then crop the center square. MAR uses it as is."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[top: top + image_size, left: left + image_size])


def find_images(root):
    """(sorted class names, [(path, class index)], {reason: [skipped files]}) of a class-folder tree ROOT/<class>/...,
    extensions matched in any case (.JPEG, .jpg, .JPG alike); clear errors for a tree that is not one."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder {root!r} does not exist (expected ROOT/<class>/<image> files)")
    classes = sorted(d.name for d in os.scandir(root) if d.is_dir())
    items, skipped = [], {}
    for i, c in enumerate(classes):
        for dp, _, files in sorted(os.walk(os.path.join(root, c))):
            for f in sorted(files):
                if f.lower().endswith(IMG_EXTENSIONS):
                    items.append((os.path.join(dp, f), i))
                else:
                    skipped.setdefault("not an image file by its extension", []).append(os.path.join(dp, f))
    # ImageNet's root given for its train folder: "classes" such as train/ and val/ that hold folders of images
    nested = [c for c in classes if any(d.is_dir() for d in os.scandir(os.path.join(root, c)))]
    if nested and any(os.path.dirname(p) != os.path.join(root, classes[i]) for p, i in items):
        raise ValueError(f"{root!r} holds folders ({', '.join(nested[:3])}) that hold folders of images: give the "
                         f"folder whose sub-folders are the classes, e.g. {os.path.join(root, nested[0])!r}")
    if not items:
        raise ValueError(f"no images found under {root!r}: expected class sub-folders holding "
                         f"{', '.join(IMG_EXTENSIONS[:5])} files, any case (ImageNet: the 'train' folder)")
    return classes, items, skipped


def describe_images(root, classes, items, skipped):
    """One line on what a class folder holds: classes, images per class, files passed over and why."""
    per = np.bincount([i for _, i in items], minlength=len(classes))
    line = (f"{root}: {len(classes)} classes, {len(items)} images ({per.min()} to {per.max()} per class, median "
            f"{int(np.median(per))})")
    for why, files in skipped.items():
        line += f"; {len(files)} files skipped ({why}, e.g. {files[0]})"
    return line


def to_rgb(im):
    """A PIL image of any mode -> 8-bit RGB: 16-bit grey scaled to 8 bits (PIL's convert would clip at 255), palette
    images through RGBA (their transparency), CMYK, grey and alpha modes by PIL's conversion."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float64)
        im = Image.fromarray((arr * (255.0 / 65535.0)).round().clip(0, 255).astype(np.uint8), "L")
    elif im.mode == "P":
        im = im.convert("RGBA")
    return im.convert("RGB")


def image_tensor(img):
    """An RGB PIL image -> (3, S, S) float tensor in [-1, 1]."""
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 127.5 - 1.0


class ImageFolder(torch.utils.data.Dataset):
    """(image (3, S, S) in [-1, 1], class index). `flip`: random horizontal flip (training). `skip_bad`: an image
    that cannot be read (truncated, not an image) is reported by path and replaced by the next readable one, instead
    of ending the run (`--bad-images skip`; `check` finds them all before training, `check_images`)."""

    def __init__(self, root, image_size=256, flip=True, skip_bad=False):
        self.classes, self.items, self.skipped = find_images(root)
        self.image_size, self.flip, self.skip_bad = image_size, flip, skip_bad

    def __len__(self):
        return len(self.items)

    def read(self, i):
        """The decoded, center-cropped image of item i, or an error that names its file."""
        path, _ = self.items[i]
        try:
            with Image.open(path) as im:
                return center_crop_arr(to_rgb(im), self.image_size)
        except (OSError, ValueError) as e:  # PIL: truncated file, unidentified format
            raise ValueError(f"cannot read image {path!r} ({e}); pass --bad-images skip to skip such files") from None

    def load(self, i):
        for j in range(len(self.items)):  # with skip_bad, the next readable item stands in (reported)
            try:
                img = self.read((i + j) % len(self.items))
                break
            except ValueError as e:
                if not self.skip_bad:
                    raise
                print(f"skipped: {str(e).split(';')[0]}", flush=True)
        else:
            raise ValueError(f"none of the {len(self.items)} images can be read")
        label = self.items[(i + j) % len(self.items)][1]
        return image_tensor(img), label

    # The loader passes (index, flip) pairs drawn from the epoch's seeded generator (`epoch_batches`), so a flip
    # depends on (seed, epoch, index) and not on a DataLoader worker's unseeded RNG: --resume is exact.
    seeded_flip = True

    def __getitem__(self, item):
        i, flip = item if isinstance(item, (tuple, list)) else (item, False)
        x, label = self.load(i)
        if self.flip and flip:
            x = x.flip(-1)
        return x, label


class CachedLatents(torch.utils.data.Dataset):
    """Posterior moments written by `python data.py cache`: (moments (2C, h, w), class index). Each item is the
    image or its mirror, each with probability 1/2 (MAR's CachedFolder, but the coin comes from the seeded epoch
    generator); sample a latent with vae.DiagonalGaussian."""

    def __init__(self, root):
        files = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(root) for f in fs)
        # Anything else in the cache would be read as latents, or ends the run hours later: refused now, by path.
        stray = [f for f in files if (not f.endswith(".npz") or f.endswith(".tmp.npz"))
                 and f != os.path.join(root, "cache.json")]  # the manifest `data.py cache` writes
        if stray:
            raise ValueError(f"{stray[0]!r} is not a cache entry ({len(stray)} such files under {root!r}; a .tmp.npz "
                             "is a write a killed `data.py cache` left): remove them, or run the cache again")
        self.files = [f for f in files if f.endswith(".npz")]
        if not self.files:
            raise ValueError(f"no cached latents (.npz) under {root!r}; write them with `python data.py cache`")
        with np.load(self.files[0]) as d:
            if not {"moments", "moments_flip", "label"} <= set(d.files):
                raise ValueError(f"{self.files[0]!r} holds {sorted(d.files)}, not a cache entry (moments, "
                                 "moments_flip, label): is --cached-path the folder `python data.py cache` wrote?")

    def __len__(self):
        return len(self.files)

    seeded_flip = True  # (index, flip) pairs from `epoch_batches`, as ImageFolder

    def __getitem__(self, item):
        i, flip = item if isinstance(item, (tuple, list)) else (item, False)
        with np.load(self.files[i]) as d:
            return torch.from_numpy(d["moments_flip" if flip else "moments"]), int(d["label"])


# ----------------------------------------------------------------------------------------------------------------
# Tokenizers: images <-> MAR latents (the same interface for the KL-16 VAE and the toy VAE)
# ----------------------------------------------------------------------------------------------------------------


class Tokenizer(torch.nn.Module):
    """encode(images in [-1, 1]) -> MAR latents, decode(latents) -> images. Differentiable (RL decodes through it).

    latents = posterior sample * scale, decode = vae.decode(latents / scale). KL-16: scale 0.2325 (MAR's); the toy
    VAE: its own `scale`, measured the same way (1 / std of the training latents). vae None: cached moments only.
    `x0_bound`: what the teacher's sampler clips its predicted x0 to (gaussian_diffusion.clip_x0): None for KL-16
    (MAR's sampler as is), the training latents' range for the toy.
    """

    def __init__(self, vae=None, scale=mar.VAE_SCALE, x0_bound=None):
        super().__init__()
        self.vae, self.scale, self.x0_bound = vae, scale, x0_bound

    def encode(self, x, generator=None):
        return self.vae.encode(x).sample(generator) * self.scale

    def latents_from_moments(self, moments, generator=None):
        """Cached posterior moments (B, 2C, h, w) -> a fresh latent sample, scaled for MAR."""
        from vae import DiagonalGaussian
        return DiagonalGaussian(moments).sample(generator) * self.scale

    def decode(self, z):
        return self.vae.decode(z / self.scale)


def toy_tokenizer(vae_model):
    """Tokenizer around a ToyVAE, with the scale and latent range it carries."""
    return Tokenizer(vae_model, float(vae_model.scale), float(vae_model.latent_bound))


def load_toy_vae(path="runs/toy_vae.pt"):
    """The toy VAE cached at `path`, trained on the toy's training split and saved (atomically) on first use, like
    the toy classifier."""
    import vae as vae_lib
    if os.path.exists(path):
        model = vae_lib.ToyVAE()
        mar.load_state_dict_strict(model, mar.read_checkpoint(path)["model"], f"toy VAE {path!r}",
                                   "It is a cache: delete it, or give another --toy-vae, to train a new one")
        return model.eval().requires_grad_(False)
    model = vae_lib.train_toy_vae(toy_digits("train")[0], toy_digits("heldout")[0])
    common.save_checkpoint(path, {"model": model.state_dict()})
    return model


def toy_tokenizer_of(path, device="cpu"):
    """The toy VAE a toy checkpoint's MAR was trained on. Every toy stage saves it inside its checkpoint under
    'toy_vae' (train_mar.py writes it, the later stages copy it), so a checkpoint always decodes with the latent
    space it was trained in, even if runs/toy_vae.pt is retrained."""
    import vae as vae_lib
    ck = mar.read_checkpoint(path)
    if "toy_vae" not in ck:
        raise ValueError(f"toy checkpoint {path!r} has no 'toy_vae' entry (every toy checkpoint of this code "
                         "carries its toy VAE): train a toy teacher with `python train_mar.py --preset toy`")
    model = vae_lib.ToyVAE()
    mar.load_state_dict_strict(model, ck["toy_vae"], "toy VAE in the checkpoint")
    return toy_tokenizer(model.eval().requires_grad_(False).to(device))


# ----------------------------------------------------------------------------------------------------------------
# The toy problem
# ----------------------------------------------------------------------------------------------------------------

TOY_HELD_OUT = 397   # fixed held-out split: the last 397 of a seeded permutation of the 1,797 digits
TOY_SPLIT_SEED = 0


def toy_digits(split="train"):
    """scikit-learn's digits as (images (N, 1, 16, 16) in [-1, 1], labels (N,)). split: 'train' (1,400),
    'heldout' (397) or 'all'. The 8x8 images (values 0..16) are upsampled 2x bilinearly."""
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0     # (1797, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False).clamp(0, 1) * 2 - 1
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(TOY_SPLIT_SEED))
    idx = {"train": perm[:-TOY_HELD_OUT], "heldout": perm[-TOY_HELD_OUT:], "all": perm}[split]
    return x[idx], y[idx]


# The toy MAR: the official architecture at toy size (~1.5M parameters) on the toy VAE's latents: img_size 16 at
# vae_stride 4 is a 4x4 latent grid, patch_size 1 makes each position a token, vae_embed_dim 16 its width, so 16
# tokens of 16 values, KL-16's token width (MAR-B: 256 tokens at stride 16, patch 1, 16 channels).
# mask_ratio_min 0.3 (MAR: 0.7): with only 16 tokens the toy also trains on mostly-visible contexts (at 0.7 the
# teacher stays under-trained). buffer_size 4 = L/4, as MAR's 64 slots for 256 tokens (16 slots make the toy
# transformer, and so the one-step student, a third slower). diffusion_batch_mul 4, MAR's: each token's head loss at
# 4 noise draws per transformer pass (a better teacher than 2 for 12% more time a step). attn_dropout /
# proj_dropout 0 (MAR: 0.1): the toy is under-trained, not over-fitting, and dropout's random draws are a sixth of a
# CPU step. The measurements behind each choice: docs/results.md, section 7.
TOY_MODEL = dict(img_size=16, vae_stride=4, patch_size=1, vae_embed_dim=16, class_num=10, buffer_size=4,
                 mask_ratio_min=0.3,
                 encoder_embed_dim=128, encoder_depth=3, encoder_num_heads=4, decoder_embed_dim=128, decoder_depth=3,
                 decoder_num_heads=4, diffloss_d=2, diffloss_w=128, diffusion_batch_mul=4,
                 attn_dropout=0.0, proj_dropout=0.0)
# Toy model sizes, the MAR-B / L / H analogue (train_mar.py --toy-size; experiments.py's model-size table): width of
# the transformer and of the head, depth of encoder and decoder. "base" is TOY_MODEL. Every toy checkpoint records
# its configuration ('toy_model'), so the later stages and sampling rebuild the right size (toy_model_of).
TOY_SIZES = {"small": dict(width=64, depth=2), "base": dict(width=128, depth=3), "large": dict(width=192, depth=4)}


def toy_config(size="base"):
    """MAR keyword arguments of a named toy size."""
    if size not in TOY_SIZES:
        raise ValueError(f"unknown toy size {size!r}; choose one of {sorted(TOY_SIZES)}")
    w, d = TOY_SIZES[size]["width"], TOY_SIZES[size]["depth"]
    return {**TOY_MODEL, "encoder_embed_dim": w, "decoder_embed_dim": w, "encoder_depth": d, "decoder_depth": d,
            "diffloss_w": w}


def toy_config_of(path):
    """The MAR configuration a toy checkpoint was trained with (its 'toy_model' entry; checkpoints written before
    sizes existed are TOY_MODEL)."""
    return dict(mar.read_checkpoint(path).get("toy_model", TOY_MODEL))


def toy_model_of(path):
    """A fresh MAR of a toy checkpoint's configuration, ready for mar.load_mar."""
    return mar.MAR(**toy_config_of(path))


def toy_entries(tokenizer, config):
    """What every toy checkpoint carries besides the weights: its VAE and its MAR configuration."""
    return {"toy_vae": tokenizer.vae.state_dict(), "toy_model": dict(config)}


# ----------------------------------------------------------------------------------------------------------------
# Training data for the stages: one call gives the dataset and how to turn a batch into MAR latents
# ----------------------------------------------------------------------------------------------------------------


def training_source(args, device, toy_tok=None):
    """(dataset of (x, label), to_latents(x, generator) -> MAR latents (B, C, H, W), steps per epoch) from the common
    flags: --preset toy (digits encoded on the fly by `toy_tok`, the toy VAE's Tokenizer, a posterior sample per
    batch as MAR's cache gives), --cached-path (posterior moments -> a fresh sample), or --data-path + --vae (images
    encoded on the fly by the frozen VAE; random flips)."""
    if getattr(args, "preset", None) == "toy":
        dataset, to_latents = torch.utils.data.TensorDataset(*toy_digits("train")), toy_tok.encode
    elif args.cached_path:
        with common.reading("--cached-path", args.cached_path):
            dataset, to_latents = CachedLatents(args.cached_path), Tokenizer(None).latents_from_moments
    else:
        import vae as vae_lib
        with common.reading("--vae", args.vae):
            tok = Tokenizer(vae_lib.load_vae(args.vae).to(device).requires_grad_(False))
        with common.reading("--data-path", args.data_path):
            dataset = ImageFolder(args.data_path, args.img_size, flip=True, skip_bad=args.bad_images == "skip")
            common.print0(describe_images(args.data_path, dataset.classes, dataset.items, dataset.skipped))
            if args.bad_images == "check":
                check_images(dataset)
        to_latents = tok.encode
    steps = len(dataset) // args.global_batch_size
    if steps == 0:
        raise common.UsageError(f"--global-batch-size {args.global_batch_size} is more than the {len(dataset)} "
                                "training items: give a smaller batch or more data")
    return dataset, to_latents, steps


def check_images(dataset, workers=8):
    """Decode every image of an ImageFolder (threads: PIL releases the GIL while decoding); an error that names up to
    five unreadable files and how many there are."""
    from concurrent.futures import ThreadPoolExecutor

    def bad(i):
        try:
            dataset.read(i)
        except ValueError:
            return dataset.items[i][0]

    with ThreadPoolExecutor(workers) as pool:
        found = [p for p in pool.map(bad, range(len(dataset)), chunksize=256) if p]
    if found:
        raise ValueError(f"{len(found)} unreadable image(s), e.g. {found[:5]}: remove or replace them, or pass "
                         "--bad-images skip")


def check_source(args):
    """Before any work: the data flags of a training stage name what they should (folders and files that exist)."""
    if getattr(args, "preset", None) == "toy":
        return
    if args.cached_path:
        common.input_path("--cached-path", args.cached_path, "the latent cache folder of `python data.py cache`",
                          folder=True)
    else:
        common.input_path("--data-path", args.data_path, "a class-folder image tree (ImageNet: its train folder)",
                          folder=True)
        common.input_path("--vae", args.vae, "the local kl16.ckpt")


def epoch_batches(n_items, global_batch, world, rank, seed, epoch):
    """This rank's batches for one epoch: (indices, flips), each (steps, global_batch // world). A permutation
    seeded by (seed, epoch), the last partial global batch dropped, rank r taking slot r of every global batch
    (DistributedSampler(shuffle=True, drop_last=True) semantics, but indexable, so a resumed run can start
    mid-epoch at the exact batch); and one horizontal-flip coin per item from the same generator."""
    steps = n_items // global_batch
    g = torch.Generator().manual_seed(seed * 10_007 + epoch)
    perm = torch.randperm(n_items, generator=g)
    flips = torch.rand(n_items, generator=g) < 0.5                                   # (n_items,), by dataset index
    idx = perm[: steps * global_batch].reshape(steps, world, global_batch // world)[:, rank]
    return idx, flips[idx]


def epoch_loader(dataset, step, global_batch, world, rank, seed, workers, device):
    """DataLoader over the rest of the epoch that `step` falls in (a resumed run starts at the exact batch; an epoch
    is len(dataset) // global_batch steps). Datasets with `seeded_flip` get (index, flip) pairs; the others (the
    toy) plain indices."""
    epoch, in_epoch = divmod(step, len(dataset) // global_batch)
    idx, flips = epoch_batches(len(dataset), global_batch, world, rank, seed, epoch)
    idx, flips = idx[in_epoch:].tolist(), flips[in_epoch:].tolist()
    if getattr(dataset, "seeded_flip", False):
        batches = [list(zip(i, f)) for i, f in zip(idx, flips)]
    else:
        batches = idx
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers,
                                       pin_memory=device.type == "cuda")


# ----------------------------------------------------------------------------------------------------------------
# `python data.py cache`: MAR's latent cache
# ----------------------------------------------------------------------------------------------------------------


class _Readable(torch.utils.data.Dataset):
    """Items `todo` of an ImageFolder for the cache: (image, "") or, for a file PIL cannot read, (zeros, the reason
    naming the file), so that the main process decides (skip or stop) rather than a DataLoader worker's traceback."""

    def __init__(self, ds, todo):
        self.ds, self.todo = ds, todo

    def __len__(self):
        return len(self.todo)

    def __getitem__(self, k):
        try:
            img = self.ds.read(self.todo[k])
        except ValueError as e:
            return torch.zeros(3, self.ds.image_size, self.ds.image_size), str(e)
        return image_tensor(img), ""


def cache_path(args, item):
    """Where the moments of dataset item (path, label) go: the image's relative path under --out-dir, as .npz."""
    rel = os.path.splitext(os.path.relpath(item[0], args.data_path))[0] + ".npz"
    return os.path.join(args.out_dir, rel)


@torch.no_grad()
def cache_latents(args):
    """Encode every image and its mirror with the VAE: one .npz of posterior moments per image (MAR's main_cache.py).

    Under torchrun rank r takes images r, r + W, ... and no rank ever waits for another: there is no collective
    (the process group is not even created), so a slow rank cannot trip a watchdog. JPEG decoding runs in --num-workers
    DataLoader processes beside the GPU. Resumable: an image whose .npz exists is skipped (each file is written
    atomically, so one that exists is complete), so a crashed or preempted run continues where it stopped.
    Returns (images encoded here, images skipped here, seconds)."""
    import vae as vae_lib
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    ds = ImageFolder(args.data_path, args.img_size, flip=False)
    ae = vae_lib.load_vae(args.vae).to(device).eval()
    # The cache's manifest: a rerun only fills in what is missing, so it must encode with the same VAE at the same size
    manifest = {"vae": common.fingerprint(ae.state_dict()), "img_size": args.img_size}
    path = os.path.join(args.out_dir, "cache.json")
    if os.path.exists(path):
        with open(path) as f:
            made = json.load(f)
        if made != manifest:
            raise common.UsageError(f"--out-dir {args.out_dir} holds a cache made with VAE weights {made['vae']} at "
                                    f"--img-size {made['img_size']}; this run has {manifest['vae']} at "
                                    f"{args.img_size}: give that VAE and size to complete it, or another --out-dir")
    elif rank == 0:
        os.makedirs(args.out_dir, exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump(manifest, f)
        os.replace(path + ".tmp", path)
    mine = range(rank, len(ds), world)
    todo = [i for i in mine if not os.path.exists(cache_path(args, ds.items[i]))]
    skipped = len(mine) - len(todo)
    if skipped:
        print(f"rank {rank}: {skipped} of its {len(mine)} images are cached already; encoding the other {len(todo)}",
              flush=True)
    loader = torch.utils.data.DataLoader(_Readable(ds, todo), batch_size=args.batch_size,
                                         num_workers=args.num_workers, pin_memory=device.type == "cuda")
    t0, done = time.time(), 0
    for x, errors in loader:                                                         # x (b, 3, S, S) in [-1, 1]
        chunk = todo[done: done + len(x)]
        done += len(x)
        for err in filter(None, errors):  # an unreadable image: the run's choice, before any of the batch is written
            if args.bad_images == "stop":
                raise common.UsageError(err.replace("pass --bad-images skip", "pass --bad-images skip (cached images "
                                                    "are kept: run again to continue)"))
            print(f"skipped: {err.split(';')[0]}", flush=True)
        x = x.to(device, non_blocking=True)
        moments = ae.encode(x).moments.cpu().numpy()                                  # (b, 2C, h, w)
        moments_flip = ae.encode(x.flip(-1)).moments.cpu().numpy()
        for j, i in enumerate(chunk):
            if errors[j]:
                continue
            out = cache_path(args, ds.items[i])
            os.makedirs(os.path.dirname(out), exist_ok=True)
            tmp = out + ".tmp.npz"
            np.savez(tmp, moments=moments[j], moments_flip=moments_flip[j], label=ds.items[i][1])
            os.replace(tmp, out)  # atomic: an interrupted run never leaves a half-written file
        if rank == 0:
            print(f"rank 0: {done}/{len(todo)} images, {done / (time.time() - t0):.1f} images/s", flush=True)
    return done, skipped, time.time() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("cache", help="encode a class-folder dataset (and its mirror images) with the VAE")
    c.add_argument("--data-path", required=True, help="ROOT/<class>/<image> (ImageNet: the train folder)")
    c.add_argument("--vae", required=True, help="local path of kl16.ckpt")
    c.add_argument("--out-dir", required=True, help="where the .npz files go (same sub-folders as the images)")
    c.add_argument("--img-size", type=common.COUNT, default=256)
    c.add_argument("--batch-size", type=common.COUNT, default=64, help="per process")
    c.add_argument("--num-workers", type=common.COUNT0, default=8, help="JPEG-decoding processes per GPU")
    c.add_argument("--bad-images", choices=["skip", "stop"], default="stop",
                   help="an unreadable image: skip it (reported by path) or stop, naming it")
    c.add_argument("--device", type=common.device_arg, default=None, help="cuda if available, else cpu")
    g = sub.add_parser("toy-grid", help="save a grid of real toy digits, one row per class")
    g.add_argument("--out", default="toy_real.png")
    args = p.parse_args(argv)
    if args.cmd == "cache":
        common.input_path("--data-path", args.data_path, "a class-folder image tree (ImageNet: its train folder)",
                          folder=True)
        common.input_path("--vae", args.vae, "the local kl16.ckpt")
        images, cache = os.path.realpath(args.data_path), os.path.realpath(args.out_dir)
        if os.path.commonpath([images, cache]) in (images, cache):  # the same folder, or one inside the other
            raise common.UsageError(f"--out-dir {args.out_dir} and --data-path {args.data_path} overlap: the cache "
                                    "would be written among the images (or the images read from the cache); give "
                                    "separate folders")
        common.writable_folder("--out-dir", args.out_dir)
        import vae as vae_lib
        with common.reading("--vae", args.vae):
            vae_lib.load_vae(args.vae)
        with common.reading("--data-path", args.data_path):
            print(describe_images(args.data_path, *find_images(args.data_path)))
        done, skipped, sec = cache_latents(args)
        print(f"rank {os.environ.get('RANK', 0)}: encoded {done} images in {sec:.1f} s "
              f"({done / max(sec, 1e-9):.1f} images/s), {skipped} found cached -> {args.out_dir}")
    else:
        x, y = toy_digits("train")
        rows = torch.cat([x[y == k][:10] for k in range(10)])
        grid = figures.make_grid(rows, 10)
        grid.resize((grid.width * 4, grid.height * 4), Image.NEAREST).save(args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    common.cli(main)
