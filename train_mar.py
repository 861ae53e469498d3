"""Teacher pre-training: MAR (Li et al. 2024, arXiv:2406.11838) with MAR's recipe.

MARVAL distills a trained MAR. For ImageNet the official checkpoints exist (load them with `mar.load_mar`); this
script is for the bundled toy problem and for new datasets. It trains the masked encoder/decoder and the diffusion
head jointly with MAR's loss: a random order and ONE masking ratio per batch (truncated Gaussian on
[mask_ratio_min, 1]), the class label dropped to `fake_latent` with probability 0.1 (for CFG), and per masked token
the head's diffusion loss (MSE on eps + variational bound on the variance) on `diffusion_batch_mul` noised copies.

Reads: the toy digits (--preset toy; encoded by the toy VAE, trained once into --toy-vae in ~40 s and saved inside
every toy checkpoint), a class-folder dataset + the KL-16 VAE (--data-path, --vae), or a latent cache
(--cached-path, from `python data.py cache`). Writes to --out-dir: checkpoint-last.pth (official MAR format:
model + model_ema, plus optimizer / step / args), log.jsonl, and for the toy grid.png (one row per class) and
eval.json (toy FID / IS / accuracy of teacher samples).

    # toy, CPU (its time and toy FID: docs/results.md, section 7)
    python train_mar.py --preset toy --out-dir runs/toy_teacher
    # ImageNet, 1 GPU / 8 GPUs (MAR-B recipe: 800 epochs at global batch 2048 in the paper; lr = blr * batch / 256)
    python train_mar.py --model mar_base --data-path IMAGENET/train --vae kl16.ckpt --out-dir runs/mar_base
    torchrun --nproc_per_node=8 train_mar.py --model mar_base --cached-path cache/ --global-batch-size 512 \
        --out-dir runs/mar_base
    # CPU smoke run
    python train_mar.py --preset toy --max-steps 20 --out-dir runs/smoke --eval-images 0

Deviations from main_mar.py: schedules are counted in optimizer steps (warmup given in epochs is converted);
randomness is re-seeded every step from (seed, rank, step), so --resume continues bit-exactly on the same hardware
and world size; bf16 autocast on GPU instead of fp16 + GradScaler (MAR issues #29, #69 report fp16 NaNs).
"""
import argparse
import copy
import json
import math
import os
import random

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import common
import figures
import evaluate
import mar

# ----------------------------------------------------------------------------------------------------------------
# The model and the learning-rate schedule
# ----------------------------------------------------------------------------------------------------------------


def build_model(args):
    """The MAR to train: the toy configuration or a named preset, with command-line overrides."""
    ckpt = {"grad_checkpointing": True} if args.grad_checkpointing else {}
    if args.preset == "toy":
        return mar.MAR(**toy_model_config(args), **ckpt)
    return mar.PRESETS[args.model](img_size=args.img_size, **head_overrides(args), **ckpt)


def toy_model_config(args):
    """The toy MAR's keyword arguments: the named --toy-size with the head / masking flags on top."""
    return {**data.toy_config(args.toy_size), **head_overrides(args)}


def head_overrides(args):
    """The head and masking flags that were given (None: the model's default)."""
    return {k: v for k, v in dict(diffloss_d=args.diffloss_d, diffloss_w=args.diffloss_w,
                                  mask_ratio_min=args.mask_ratio_min,
                                  diffusion_batch_mul=args.diffusion_batch_mul).items() if v is not None}


def build_optimizer(model, lr, weight_decay):
    """MAR's AdamW (betas 0.9, 0.95), weight decay on the matrices outside the diffusion head only (no biases,
    norms, embeddings of rank 1, or head weights)."""
    decays = lambda n, p: p.ndim > 1 and not n.endswith(".bias") and "diffloss" not in n
    decay = [p for n, p in model.named_parameters() if decays(n, p)]
    no_decay = [p for n, p in model.named_parameters() if not decays(n, p)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))


def train_step(model, opt, latents, labels, gen, precision="fp32", grad_clip=3.0, mask_ratio=None):
    """One optimizer step of MAR's loss (MAR arXiv:2406.11838 Eq. 1 over the masked tokens): forward under bf16
    autocast if asked, backward (DDP averages the gradients over ranks there), gradient clipping, AdamW.

    model: the MAR (or its DDP wrapper); latents (B, C, H, W) MAR-scaled; labels (B,); gen: this step's generator
    (orders, mask ratio, label dropout, t and noise); mask_ratio: force one (bench.py's dry run: the worst case).
    Returns (loss, grad norm) as 0-d tensors: the caller reads them (a host copy) when it logs.
    """
    with torch.autocast(latents.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        loss = model(latents, labels, generator=gen, mask_ratio=mask_ratio)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    return loss.detach(), grad_norm


def lr_at(step, total, warmup, base, schedule, min_lr):
    """Linear warmup from 0, then constant or half-cosine to min_lr (MAR util/lr_sched.py, counted in steps)."""
    if step < warmup:
        return base * step / warmup
    if schedule == "constant":
        return base
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + (base - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------

# What defines a teacher-training run: --resume refuses a checkpoint made with other values (common.check_record).
RESUME_KEYS = ("preset", "model", "toy_size", "img_size", "global_batch_size", "diffloss_d", "diffloss_w",
               "mask_ratio_min", "diffusion_batch_mul", "seed")
TOY_DEFAULTS = dict(out_dir="runs/toy_teacher", global_batch_size=64, lr=1e-3, lr_schedule="cosine", min_lr=1e-5,
                    warmup_epochs=5, epochs=380, weight_decay=0.02, ema_rate=0.999, ema_warmup=True, grad_clip=3.0,
                    log_every=50, save_every=500)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("setup")
    g.add_argument("--preset", choices=["toy"], default=None, help="the bundled toy digits with a ~1.5M-param MAR")
    g.add_argument("--model", choices=list(mar.PRESETS), default="mar_base", help="architecture (ignored by --preset)")
    g.add_argument("--out-dir", default=None, help="checkpoint, log.jsonl, samples (toy: runs/toy_teacher)")
    g.add_argument("--resume", action="store_true", help="continue from OUT_DIR/checkpoint-last.pth if present")
    g.add_argument("--overwrite", action="store_true", help="start over in an --out-dir that holds a checkpoint")
    g.add_argument("--max-steps", type=common.COUNT, default=None, help="stop after this many optimizer steps in all")
    g.add_argument("--seed", type=common.SEED, default=1)
    g.add_argument("--device", type=common.device_arg, default=None, help="cuda if available, else cpu")
    common.add_run_flags(g)
    g = p.add_argument_group("data")
    g.add_argument("--data-path", default=None, help="class-folder images (ImageNet train), encoded on the fly")
    g.add_argument("--bad-images", choices=["skip", "check"], default="skip",
                   help="an unreadable image in --data-path: skip it (each one reported by path) or check every image "
                        "before training and stop, naming them")
    g.add_argument("--cached-path", default=None, help="latent cache written by `python data.py cache`")
    g.add_argument("--vae", default=None, help="local path of kl16.ckpt (with --data-path)")
    g.add_argument("--img-size", type=common.COUNT, default=256)
    g.add_argument("--global-batch-size", type=common.COUNT, default=2048, help="MAR: 64 per GPU x 32 GPUs")
    g.add_argument("--num-workers", type=common.COUNT0, default=8)
    g = p.add_argument_group("model")
    g.add_argument("--diffloss-d", type=common.COUNT, default=None, help="head depth (default: the preset's)")
    g.add_argument("--diffloss-w", type=common.COUNT, default=None, help="head width (default: the preset's)")
    g.add_argument("--mask-ratio-min", type=common.FRACTION, default=None, help="MAR: 0.7")
    g.add_argument("--diffusion-batch-mul", type=common.COUNT, default=None, help="noised copies per token (MAR: 4)")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute blocks in backward (big models)")
    g = p.add_argument_group("optimisation (MAR's recipe by default)")
    g.add_argument("--epochs", type=common.COUNT, default=800)
    g.add_argument("--blr", type=common.POSITIVE, default=1e-4, help="base lr: lr = blr * global batch / 256")
    g.add_argument("--lr", type=common.POSITIVE, default=None, help="absolute lr (overrides --blr)")
    g.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant")
    g.add_argument("--min-lr", type=common.NONNEG, default=0.0)
    g.add_argument("--warmup-epochs", type=common.NONNEG, default=100)
    g.add_argument("--weight-decay", type=common.NONNEG, default=0.02, help="not on biases, norms or the head")
    g.add_argument("--grad-clip", type=common.POSITIVE, default=3.0)
    g.add_argument("--ema-rate", type=common.FRACTION, default=0.9999)
    g.add_argument("--ema-warmup", action="store_true", help="EMA decay min(rate, (1+n)/(10+n)): for short runs")
    g.add_argument("--precision", choices=["fp32", "bf16"], default=None, help="default: bf16 on GPU, fp32 on CPU")
    g = p.add_argument_group("logging and evaluation")
    g.add_argument("--log-every", type=common.COUNT, default=100)
    g.add_argument("--save-every", type=common.COUNT0, default=0,
                   help="also save every N optimizer steps (0: by --save-minutes only)")
    g.add_argument("--eval-images", type=common.COUNT0, default=400,
                   help="toy: teacher samples scored at the end (0: none)")
    g.add_argument("--eval-num-iter", type=common.COUNT, default=16,
                   help="toy: AR iterations K for the final samples (K = L)")
    g.add_argument("--eval-cfg", type=common.NONNEG, default=1.0, help="toy: CFG scale for the final samples")
    g.add_argument("--classifier", default="runs/toy_classifier.pt", help="toy evaluator cache")
    g.add_argument("--toy-vae", default="runs/toy_vae.pt", help="toy tokenizer cache (trained on first use, ~40 s)")
    g.add_argument("--toy-size", choices=list(data.TOY_SIZES), default="base",
                   help="toy width/depth (data.TOY_SIZES; the MAR-B/L/H analogue)")
    args = p.parse_args(argv)
    if args.preset == "toy":  # toy defaults, but flags given explicitly still win
        p.set_defaults(**TOY_DEFAULTS)
        args = p.parse_args(argv)
    elif not (args.data_path or args.cached_path):
        p.error("give --preset toy, or --data-path (with --vae) or --cached-path")
    if args.data_path and not args.vae:
        p.error("--data-path needs --vae (the local kl16.ckpt) to encode images")
    if args.out_dir is None:
        p.error("--out-dir is required: the folder for checkpoint-last.pth and log.jsonl")
    if args.preset != "toy" and args.img_size % 16:
        p.error(f"--img-size {args.img_size} is not a multiple of the VAE's stride 16")
    if args.preset == "toy" and args.eval_images % 10:
        p.error(f"--eval-images {args.eval_images} is not a multiple of the 10 digit classes")
    return args


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------


def main(argv=None):
    args = get_args(argv)
    # ------------------------------------------------------------------------------------------------------------
    # Setup
    # ------------------------------------------------------------------------------------------------------------
    data.check_source(args)
    rank, world, device, bsz = common.start_run(args, outputs=("grid.png",))
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    if args.preset == "toy" and args.eval_images > 0 and os.path.exists(args.classifier):
        with common.reading("--classifier", args.classifier):  # read now, not after training
            evaluate.load_toy_classifier(args.classifier)

    # ------------------------------------------------------------------------------------------------------------
    # Data: every source yields (x, label) where x becomes MAR latents (B, C, H, W) in `to_latents`
    # ------------------------------------------------------------------------------------------------------------
    ckpt_path = os.path.join(args.out_dir, "checkpoint-last.pth")
    if args.preset == "toy":
        resuming = args.resume and os.path.exists(ckpt_path)
        with common.reading("--resume" if resuming else "--toy-vae", ckpt_path if resuming else args.toy_vae):
            toy_tok = toy_tokenizer_for_run(args, ckpt_path, device)
    else:
        toy_tok = None
    dataset, to_latents, steps_per_epoch = data.training_source(args, device, toy_tok)
    total_steps = args.epochs * steps_per_epoch
    warmup_steps = int(args.warmup_epochs * steps_per_epoch)

    # ------------------------------------------------------------------------------------------------------------
    # Model, EMA, optimizer (identical init on every rank: seeded before construction)
    # ------------------------------------------------------------------------------------------------------------
    torch.manual_seed(args.seed)
    model = build_model(args).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())
    n_head = sum(p.numel() for p in model.diffloss.parameters())
    common.print0(f"MAR: {n_params / 1e6:.2f}M parameters ({n_head / 1e6:.2f}M"
               f" in the head); {total_steps} steps of {args.global_batch_size} ({args.epochs} epochs)")
    base_lr = args.lr if args.lr is not None else args.blr * args.global_batch_size / 256
    opt = build_optimizer(model, base_lr, args.weight_decay)
    step = 0
    record = common.run_record("train_mar.py", args, RESUME_KEYS)
    if args.resume and os.path.exists(ckpt_path):
        with common.reading("--resume", ckpt_path):
            ck = mar.read_checkpoint(ckpt_path)
            common.check_record(ck, record, ckpt_path)
            mar.load_state_dict_strict(model, ck["model"], ckpt_path)
            mar.load_state_dict_strict(ema, ck["model_ema"], ckpt_path + " [model_ema]")
            opt.load_state_dict(ck["optimizer"])
            step = ck["step"]
        common.print0(f"resumed from {ckpt_path} at step {step}")
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else model

    diverged = f"lower {'--lr' if args.lr is not None else '--blr'} (now {args.lr or args.blr})"

    def save():
        common.assert_finite(model, diverged)  # every rank: the same weights, the same verdict
        if common.is_main():
            # a toy checkpoint carries its VAE and its configuration (data.toy_entries)
            extra = data.toy_entries(toy_tok, toy_model_config(args)) if toy_tok else {}
            common.save_checkpoint(ckpt_path, {"kind": "teacher", "record": record, "model": model.state_dict(),
                                               "model_ema": ema.state_dict(),
                                               "optimizer": opt.state_dict(), "step": step, "args": vars(args),
                                               **extra})

    # ------------------------------------------------------------------------------------------------------------
    # Loop
    # ------------------------------------------------------------------------------------------------------------
    last = min(total_steps, args.max_steps) if args.max_steps is not None else total_steps
    common.check_run_length(last, world)
    log = common.RunLog(args.out_dir, last, step, "train_mar", batch=args.global_batch_size, diverged=diverged)
    control = common.StepControl(args.save_minutes)
    model.train()
    workers = 0 if args.preset == "toy" else args.num_workers
    while step < last and not control.stopped:
        loader = data.epoch_loader(dataset, step, args.global_batch_size, world, rank, args.seed, workers,
                                   device)
        for xb, yb in loader:
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            # this step's randomness (common.step_seed): orders, label drop, t and noise on the device; dropout from
            # torch's global seed; the mask ratio on the host (its shape decisions need no GPU round trip)
            gen = torch.Generator(device).manual_seed(common.step_seed(args.seed, rank, step, world))
            torch.manual_seed(common.step_seed(args.seed, rank, step, world, stream=1))
            u = random.Random(common.step_seed(args.seed, rank, step, world, stream=2)).random()
            mask_ratio = mar.truncnorm_mask_ratio(model.mask_ratio_min, u)
            with torch.no_grad():
                latents = to_latents(xb, gen)  # (B, C, H, W), MAR-scaled
            lr = lr_at(step, total_steps, warmup_steps, base_lr, args.lr_schedule, args.min_lr)
            for group in opt.param_groups:
                group["lr"] = lr
            loss, grad_norm = train_step(ddp, opt, latents, yb, gen, precision, args.grad_clip, mask_ratio)
            step += 1
            common.update_ema(ema, model, common.ema_decay(args.ema_rate, step, args.ema_warmup))
            log.add({"loss": loss, "grad_norm": grad_norm})
            save_now, stop = control.poll(step, last, args.save_every)
            if step % args.log_every == 0 or save_now:
                log.flush(step, total=last, lr=lr)  # raises on a non-finite loss, before the save
            if save_now:
                save()
                control.saved()
            if stop or step >= last:
                break
    log.close()
    control.close()
    if control.stopped:
        control.report(step)
        common.cleanup_distributed()
        return
    common.assert_ranks_agree(model)

    # ------------------------------------------------------------------------------------------------------------
    # Toy: sample the EMA teacher (100 head steps) on every rank's share, decode with the toy VAE; the main process
    # scores and writes after the last collective
    # ------------------------------------------------------------------------------------------------------------
    toy_eval = args.preset == "toy" and args.eval_images > 0
    if toy_eval:
        samples = evaluate.sample_toy(ema, toy_tok, args.eval_images, args.eval_num_iter, args.eval_cfg)
    common.cleanup_distributed()
    if toy_eval and common.is_main():
        result = evaluate_toy_teacher(*samples, args)
        with open(os.path.join(args.out_dir, "eval.json"), "w") as f:
            json.dump(result, f, indent=2)
        print("toy teacher: " + ", ".join(f"{k} {v:.4g}" for k, v in result.items() if isinstance(v, float)))


def toy_tokenizer_for_run(args, ckpt_path, device):
    """The toy VAE: the one inside the checkpoint when resuming (the latent space the run started in), else the
    cached --toy-vae file, trained on first use by rank 0 while the other ranks wait."""
    if args.resume and os.path.exists(ckpt_path):
        return data.toy_tokenizer_of(ckpt_path, device)
    if common.is_main():
        data.load_toy_vae(args.toy_vae)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return data.toy_tokenizer(data.load_toy_vae(args.toy_vae).to(device))


def evaluate_toy_teacher(imgs, labels, sec, args):
    """Score the toy teacher's samples (100 head steps per token) with the toy classifier; grid.png."""
    ev = evaluate.ToyEvaluator(args.classifier)
    figures.save_class_grid(imgs, labels, os.path.join(args.out_dir, "grid.png"))
    return dict(ev(imgs, labels), real_split_fid=ev.real_split_fid(), sec_per_image=sec,
                num_images=len(imgs), num_iter=args.eval_num_iter, cfg=args.eval_cfg, diffusion_steps=100)


if __name__ == "__main__":
    common.cli(main)
