"""Sampling at the ImageNet protocol (MAR teacher or MARVAL student), on any number of GPUs.

Every image has a global index i, a class label (50 per class for FID-50K: i // (N / classes)) and its own
torch.Generator seeded from (seed, i), and batches are laid out as in MAR's evaluation (global batch s, rank r takes
indices [s*B*W + r*B, s*B*W + (r+1)*B)), so an image's pixels do not depend on the number of GPUs.

Writes to --out-dir: images/{index:05d}.png (uint8, rounded, never JPEG), samples.npz in the ADM evaluator's
format (arr_0: uint8 (N, H, W, 3) in a fixed SHUFFLED order, because the Inception Score splits consecutive
chunks; labels: (N,) in the same order), grid.png (the first images with their labels), and a JSON (--json,
default OUT_DIR/sample.json) with images/s. Each rank also keeps its images in memory and writes them as one shard,
which the main process joins into samples.npz (and deletes) after the process group has ended.

    # MARVAL-H student (one head step per token, no CFG), 8 GPUs, FID-50K
    torchrun --nproc_per_node=8 sample.py --ckpt marval_huge.pth --vae kl16.ckpt --model mar_huge \
        --num-images 50000 --num-iter 128 --one-step --out-dir samples/marval_h
    # the MAR-B teacher the official way: 256 AR steps x 100 diffusion steps, linear CFG 2.9
    torchrun --nproc_per_node=8 sample.py --ckpt mar_base/checkpoint-last.pth --vae kl16.ckpt --model mar_base \
        --num-images 50000 --num-iter 256 --num-diffusion-steps 100 --cfg 2.9 --out-dir samples/mar_b
    # one GPU: the same flags without torchrun
    python sample.py --ckpt marval_base.pth --vae kl16.ckpt --model mar_base --num-images 1000 --one-step --out-dir s/
    # toy digits on a CPU
    python sample.py --preset toy --ckpt runs/toy_student/checkpoint-last.pth --one-step --num-images 400 \
        --num-iter 4 --out-dir samples/toy_student
"""
import argparse
import json
import os
import time

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw

import data
import common
import mar


AUTOCAST = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Sampling precision by device. The first reverse step of the 100-step respacing predicts x0 with the head's eps
# error times sqrt(1/abar_999 - 1) = 20,291, about 316 in the next state x_989, so the mantissa matters: fp16 keeps
# 11 bits, bf16 8. bf16 is the GPU default, measured on a toy teacher whose clipped x0 hides that amplification
# (docs/results.md, section 10): recheck fp16 against bf16 on ImageNet.
PRECISION_DEFAULT = {"cuda": "bf16", "cpu": "fp32"}


def labels_for(n, class_num):
    """Label of each global index: n / class_num consecutive images per class (50 per class for FID-50K)."""
    if n % class_num:
        raise common.UsageError(f"--num-images {n} is not a multiple of the {class_num} classes (balanced classes): "
                                f"give a multiple of {class_num}")
    return torch.arange(n) // (n // class_num)


def to_uint8(images):
    """[-1, 1] floats (B, C, H, W) -> uint8 (B, H, W, C), clipped and ROUNDED (not truncated)."""
    return ((images.float() + 1) * 127.5).clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


def earlier_samples(out_dir):
    """What an earlier run left in `out_dir` that a reader would take for this run's: images/, samples.npz, the
    grid, the JSON and any shard."""
    if not os.path.isdir(out_dir):
        return []
    names = ["samples.npz", "grid.png", "sample.json"] + [f for f in os.listdir(out_dir) if f.startswith("shard-")]
    found = [os.path.join(out_dir, f) for f in names if os.path.exists(os.path.join(out_dir, f))]
    images = os.path.join(out_dir, "images")
    return found + ([images] if os.path.isdir(images) and os.listdir(images) else [])


def labelled_grid(arr, labels, path, n=32, ncol=8):
    """The first n images in a grid, each with its class label written under it."""
    arr, labels = arr[:n], labels[:n]
    h, w = arr.shape[1:3]
    scale = max(1, 64 // h)
    cell_w, cell_h = w * scale, h * scale + 12
    rows = (len(arr) + ncol - 1) // ncol
    canvas = Image.new("RGB", (ncol * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (img, lab) in enumerate(zip(arr, labels)):
        im = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).convert("RGB")
        r, c = divmod(i, ncol)
        canvas.paste(im.resize((cell_w, h * scale), Image.NEAREST), (c * cell_w, r * cell_h))
        draw.text((c * cell_w + 2, r * cell_h + h * scale), str(int(lab)), fill="black")
    canvas.save(path)


@torch.no_grad()  # inference: with grad mode on, the latents would carry the graph of every AR step (and head step)
def generate(model, tokenizer, labels, gens, args, precision):
    """One batch of images in [-1, 1] (B, C, H, W) for `labels` (B,), one generator per image, with the sampler
    flags of `args` (teacher, or --one-step student) under `precision` autocast. Holds no autograd graph: at MAR-B,
    64 images and K = 64 a graph would keep every transformer activation of every AR step (bench.py --dry-run
    measures this function at the paper's sizes)."""
    with torch.autocast(labels.device.type, dtype=AUTOCAST[precision], enabled=precision != "fp32"):
        head = mar.HeadSampler(one_step=args.one_step, steps=args.num_diffusion_steps, temperature=args.temperature,
                               clip=tokenizer.x0_bound)
        latents = model.sample_tokens(len(labels), num_iter=args.num_iter, cfg=args.cfg,
                                      cfg_schedule=args.cfg_schedule, labels=labels, head=head, generator=gens)
        return tokenizer.decode(latents.float())


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--ckpt", required=True, help="MAR-format checkpoint (official, train_mar, distill_gsim, rl_refine)")
    g.add_argument("--preset", choices=["toy"], default=None,
                   help="the toy digits model (its toy VAE is inside --ckpt)")
    g.add_argument("--model", choices=list(mar.PRESETS), default="mar_base")
    g.add_argument("--img-size", type=common.COUNT, default=256, help="image size of the model (MAR: 256)")
    g.add_argument("--vae", default=None, help="local kl16.ckpt (not for --preset toy)")
    g.add_argument("--no-ema", action="store_true", help="use 'model' instead of the EMA weights")
    g = p.add_argument_group("sampler")
    g.add_argument("--one-step", action="store_true", help="MARVAL: one head call per token from t* = 400")
    g.add_argument("--num-diffusion-steps", type=common.COUNT, default=100, help="teacher: reverse steps per token")
    g.add_argument("--num-iter", type=common.COUNT, default=64,
                   help="AR iterations K (MAR: 256 for the table, 64 fast)")
    g.add_argument("--cfg", type=common.NONNEG, default=1.0,
                   help="CFG scale (MAR-B 2.9, L 3.0, H 3.2; MARVAL student 1)")
    g.add_argument("--cfg-schedule", choices=["linear", "constant"], default="linear")
    g.add_argument("--temperature", type=common.POSITIVE, default=1.0)
    g = p.add_argument_group("run")
    g.add_argument("--num-images", type=common.COUNT, default=50000)
    g.add_argument("--class-num", type=common.COUNT, default=None, help="default: the model's")
    # 256: at batch 1-64 the sampler is launch-bound (the time model of bench.py; docs/results.md section 12), so a
    # larger batch costs little more per call: the teacher 1.6x (MAR-B) to 1.2x (MAR-H) faster an image than at 64,
    # within 6-18% of 1024, at 17-22 GiB; MAR's own evaluation uses 256 (MAR-H: 128).
    g.add_argument("--batch-size", type=common.COUNT, default=256, help="per process")
    g.add_argument("--seed", type=common.SEED, default=0)
    g.add_argument("--device", type=common.device_arg, default=None)
    common.add_run_flags(g, checkpoints=False)
    g.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None,
                   help="autocast of the sampler (MAR evaluates in fp16); default: see PRECISION_DEFAULT")
    g.add_argument("--out-dir", required=True)
    g.add_argument("--overwrite", action="store_true", help="replace the samples an earlier run left in --out-dir")
    g.add_argument("--json", default=None, help="default: OUT_DIR/sample.json")
    args = p.parse_args(argv)
    if args.preset != "toy" and not args.vae:
        p.error("--vae (the local kl16.ckpt) is needed to decode latents into images")
    return args


def main(argv=None):
    args = get_args(argv)
    common.input_path("--ckpt", args.ckpt, "a MAR-format checkpoint file")
    if args.preset != "toy":
        common.input_path("--vae", args.vae, "the local kl16.ckpt")
    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        raise common.UsageError(f"--out-dir {args.out_dir} is a file; give a folder for the images")
    img_dir = os.path.join(args.out_dir, "images")
    old = earlier_samples(args.out_dir)
    # listed before the process group starts (its rendezvous waits for every rank): no rank removes any before all list
    pngs = sorted(os.listdir(img_dir)) if old and os.path.isdir(img_dir) else []
    if old and not args.overwrite:  # an earlier run's images beside this run's would be read as this run's
        raise common.UsageError(f"--out-dir {args.out_dir} already holds samples ({os.path.basename(old[0])}): "
                                "pass --overwrite to replace them, or give another --out-dir")
    common.check_outputs([("--json", args.json or os.path.join(args.out_dir, "sample.json")),
                          ("--out-dir", os.path.join(args.out_dir, "samples.npz")),
                          ("--out-dir", os.path.join(args.out_dir, "grid.png"))],
                         [("--ckpt", args.ckpt), ("--vae", args.vae)])
    rank, world, device = common.setup_distributed(args.device, args.dist_timeout)
    precision = args.precision or PRECISION_DEFAULT[device.type]

    # -- model and tokenizer, read before anything is written ------------------------------------------------------
    # A one-step student samples with --one-step, a teacher without: the other way round gives noise, not images.
    expect = "student" if args.one_step else "teacher"
    with common.reading("--ckpt", args.ckpt):
        model = data.toy_model_of(args.ckpt) if args.preset == "toy" else \
            mar.PRESETS[args.model](img_size=args.img_size)
        try:
            mar.load_mar(args.ckpt, model, use_ema=not args.no_ema, verbose=common.is_main(), expect=expect)
        except ValueError as e:
            if "not a" not in str(e):
                raise
            fix = "drop --one-step (a teacher samples with its head's diffusion)" if args.one_step else \
                "add --one-step (a student's head is a one-step generator)"
            raise common.UsageError(f"--ckpt {args.ckpt}: {e}; {fix}") from None
        tokenizer = data.toy_tokenizer_of(args.ckpt, device) if args.preset == "toy" else None
    model = model.to(device).eval()
    if tokenizer is None:
        import vae as vae_lib
        with common.reading("--vae", args.vae):
            tokenizer = data.Tokenizer(vae_lib.load_vae(args.vae).to(device))
    if (args.class_num or 0) > model.class_num:
        raise common.UsageError(f"--class-num {args.class_num} is more than the model's {model.class_num} classes")
    labels = labels_for(args.num_images, args.class_num or model.class_num)
    if old:  # --overwrite: the earlier run's files go before this run writes any, the PNGs shared out over the ranks
        for i in common.my_share(len(pngs)):
            os.remove(os.path.join(img_dir, pngs[i]))
        for f in (f for f in old if f != img_dir and common.is_main()):
            os.remove(f)
    if dist.is_initialized():
        dist.barrier()  # before any rank writes into the folder the earlier run's files are gone
    os.makedirs(img_dir, exist_ok=True)
    mode = "one-step (MARVAL)" if args.one_step else f"teacher, {args.num_diffusion_steps} head steps"
    common.print0(f"sampling {args.num_images} images, {mode}, K={args.num_iter}, cfg {args.cfg} "
                  f"({args.cfg_schedule}), {world} process(es), batch {args.batch_size} each")

    # -- sample this rank's batches --------------------------------------------------------------------------------
    B, W = args.batch_size, world
    steps = (args.num_images + B * W - 1) // (B * W)
    t0 = time.time()
    it = range(steps)
    if common.is_main():
        from tqdm import tqdm
        it = tqdm(it, desc="sample", dynamic_ncols=True)
    mine, arrays = [], []  # this rank's global indices and their uint8 images (its shard)
    for s in it:
        idx = [i for i in range(s * B * W + rank * B, s * B * W + (rank + 1) * B) if i < args.num_images]
        if not idx:
            continue
        gens = [torch.Generator(device).manual_seed(common.image_seed(args.seed, i)) for i in idx]  # one per image
        arr = to_uint8(generate(model, tokenizer, labels[idx].to(device), gens, args, precision)).numpy()
        for i, img in zip(idx, arr):
            Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(os.path.join(img_dir, f"{i:05d}.png"))
        mine += idx
        arrays.append(arr)
    elapsed = time.time() - t0
    # Each rank writes its shard (atomically), then the process group ends: the main process joins the shards with no
    # rank waiting in a collective behind it (re-reading 50,000 PNGs takes minutes, past NCCL's watchdog).
    shard = os.path.join(args.out_dir, f"shard-{rank:05d}-of-{world:05d}.npz")
    tmp = shard + ".tmp.npz"
    np.savez(tmp, index=np.array(mine, dtype=np.int64),
             images=np.concatenate(arrays) if arrays else np.zeros((0,), np.uint8))
    os.replace(tmp, shard)
    common.cleanup_distributed()  # its barrier: every shard is on disk

    # -- the main process alone: ADM-format .npz (shuffled), labelled grid, JSON ---------------------------------
    if common.is_main():
        arr = join_shards(args.out_dir, world, args.num_images)                       # (N, H, W, C) by index
        perm = np.random.RandomState(args.seed).permutation(args.num_images)
        tmp = os.path.join(args.out_dir, "samples.tmp.npz")
        np.savez(tmp, arr_0=arr[perm], labels=labels.numpy()[perm], index=perm)
        os.replace(tmp, os.path.join(args.out_dir, "samples.npz"))
        for r in range(world):
            os.remove(os.path.join(args.out_dir, f"shard-{r:05d}-of-{world:05d}.npz"))
        labelled_grid(arr, labels.numpy(), os.path.join(args.out_dir, "grid.png"))
        done = len(mine)
        result = {"num_images": args.num_images, "world_size": world, "seconds": elapsed,
                  "images_per_sec": done * world / elapsed, "sec_per_image_per_process": elapsed / done,
                  "one_step": args.one_step, "num_iter": args.num_iter, "cfg": args.cfg,
                  "cfg_schedule": args.cfg_schedule,
                  "num_diffusion_steps": None if args.one_step else args.num_diffusion_steps,
                  "temperature": args.temperature, "device": str(device), "precision": precision, "ckpt": args.ckpt}
        with open(args.json or os.path.join(args.out_dir, "sample.json"), "w") as f:
            json.dump(result, f, indent=2)
        print(f"{args.num_images} images in {elapsed:.1f} s: {result['images_per_sec']:.2f} images/s "
              f"-> {os.path.join(args.out_dir, 'samples.npz')}")


def join_shards(out_dir, world, n):
    """The `world` shards' images in global index order (n, H, W, C); every index 0..n-1 exactly once."""
    parts = []
    for r in range(world):
        with np.load(os.path.join(out_dir, f"shard-{r:05d}-of-{world:05d}.npz")) as d:
            if len(d["index"]):
                parts.append((d["index"], d["images"]))
    index = np.concatenate([i for i, _ in parts])
    if sorted(index.tolist()) != list(range(n)):
        raise RuntimeError(f"the shards in {out_dir} do not hold images 0..{n - 1} exactly once")
    arr = np.concatenate([a for _, a in parts])[np.argsort(index)]
    return arr[..., None] if arr.ndim == 3 else arr  # (N, H, W, C)


if __name__ == "__main__":
    common.cli(main)
