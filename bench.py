"""Speed and memory: MAR teacher vs MARVAL student sampling, the transformer-only lower bound, and RL-step memory.

Random weights are fine for speed (the work per call does not depend on the values). At the same architecture,
batch and K:
  * teacher = MAR's sampler: a 100-step diffusion head per token, CFG with the batch doubled (linear 2.9 for MAR-B),
  * student = MARVAL's sampler: one head call per token, cfg 1 (no doubled batch),
  * lower bound = K encoder+decoder passes at the same batch with no head and no CFG: the time a one-step student
    cannot go below without touching the transformer. student / lower bound near 1 means the head is no longer the
    bottleneck; MARVAL's speed-up then comes from removing 100 head steps AND the CFG doubling.
  * --gsim-memory: peak memory of one GSIM distillation step (mask ratio 1, the worst case) at two or more small
    batches (--batches), extrapolated along the fitted line to --per-gpu images (the paper: 64 per GPU).
  * --rl-memory K1 K2 ...: peak memory of one RL step (sample with gradients + backward) at each K, with and without
    per-AR-step checkpointing (each measured in a fresh process on CPU: peak RSS growth; on CUDA: max allocated).

CPU by default (threads: torch's default, printed), CUDA when present with bf16 autocast. JSON with --json.

    python bench.py                                   # mar_tiny, batch 1, K 16
    python bench.py --model mar_base --batch 1 --num-iter 16 --json bench_base_cpu.json
    python bench.py --model mar_huge --batch 64 --num-iter 64 --device cuda
    python bench.py --rl-memory 8 16 32 64            # toy-sized model, batch 4
    python bench.py --gsim-memory --model mar_huge --per-gpu 64 --json gsim_mem_h.json   # fits an 80 GB GPU?
"""
import argparse
import os
import resource
import subprocess
import sys
import time

import torch

import common
import data
import mar
from evaluate import print_and_save


def timed(fn, device, repeats):
    """Median wall time of fn() over `repeats` runs after one warm-up run."""
    # The warm-up run takes one-off costs out of the timing: CUDA context and kernel selection, allocator growth,
    # the respaced diffusion built on first use. On CUDA, synchronise around each run: kernels are asynchronous.
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


@torch.no_grad()
def transformer_only(model, bsz, num_iter, labels):
    """K encoder+decoder passes with the sampler's mask progression, no head, no CFG (the lower bound)."""
    # Same work as the sampler's transformer part: the sparse encoder sees the buffer + the tokens known so far, the
    # decoder all positions; only the per-token head calls (and the CFG doubling) are left out.
    L, C = model.seq_len, model.token_embed_dim
    tokens, mask = torch.zeros(bsz, L, C, device=labels.device), torch.ones(bsz, L, device=labels.device)
    orders = model.sample_orders(bsz, device=labels.device)
    n_masked = L
    for n_pred, _ in mar.mask_schedule(L, num_iter):
        model.conditions(tokens, mask, model.class_emb(labels))
        mask = torch.zeros_like(mask).scatter(1, orders[:, : n_masked - n_pred], 1.0)
        n_masked -= n_pred


def build(name):
    if name == "toy":
        return mar.MAR(**data.TOY_MODEL)
    return mar.PRESETS[name]()


def speed(args, device):
    """Teacher, student and lower bound at the same model, batch and K; seconds per image and ratios."""
    torch.manual_seed(0)
    model = build(args.model).to(device).eval()
    labels = torch.arange(args.batch, device=device) % model.class_num
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    run = lambda **kw: model.sample_tokens(args.batch, num_iter=args.num_iter, labels=labels, **kw)
    out = {"model": args.model, "device": str(device), **common.machine(device), "batch": args.batch,
           "num_iter": args.num_iter, "teacher_cfg": args.cfg, "num_diffusion_steps": args.num_diffusion_steps,
           "params": sum(p.numel() for p in model.parameters())}
    with torch.no_grad(), amp:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t = timed(lambda: run(cfg=args.cfg, num_diffusion_steps=args.num_diffusion_steps), device, args.repeats)
        out["teacher_sec_per_image"] = t / args.batch
        if device.type == "cuda":
            out["teacher_peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2 ** 30
            torch.cuda.reset_peak_memory_stats()
        t = timed(lambda: run(one_step=True), device, args.repeats)
        out["student_sec_per_image"] = t / args.batch
        if device.type == "cuda":
            out["student_peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2 ** 30
        t = timed(lambda: transformer_only(model, args.batch, args.num_iter, labels), device, args.repeats)
        out["lower_bound_sec_per_image"] = t / args.batch
    out["speedup"] = out["teacher_sec_per_image"] / out["student_sec_per_image"]
    out["student_over_lower_bound"] = out["student_sec_per_image"] / out["lower_bound_sec_per_image"]
    out["teacher_images_per_sec"] = 1 / out["teacher_sec_per_image"]
    out["student_images_per_sec"] = 1 / out["student_sec_per_image"]
    return out


def rl_step_memory(model_name, K, bsz, checkpoint_steps, device):
    """Peak memory (MiB) of one RL step: one-step sampling with gradients through K AR steps, then backward."""
    torch.manual_seed(0)
    model = build(model_name).to(device).eval()
    labels = torch.arange(bsz, device=device) % model.class_num
    # Only the growth caused by the step counts: weights and the Python process are in the baseline. On CPU the
    # peak resident set (ru_maxrss) of a fresh process is the honest measure: torch's CPU allocator is not tracked.
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB, after the model is built
    out = model.sample_tokens(bsz, num_iter=K, labels=labels, one_step=True, checkpoint_steps=checkpoint_steps,
                              generator=torch.Generator(device).manual_seed(0))
    out.square().mean().backward()
    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024


def rl_memory(args, device):
    """The RL-step memory table: each K with and without per-AR-step checkpointing. Without it, the activations of
    all K transformer passes stay alive until backward; with it, only each step's inputs do (plus one step's
    activations, recomputed during backward)."""
    rows = []
    for K in args.rl_memory:
        for ckpt in (False, True):
            if device.type == "cuda":
                mib = rl_step_memory(args.rl_model, K, args.rl_batch, ckpt, device)
            else:  # a fresh process per measurement: RSS peaks only grow
                code = (f"import bench, torch; print(bench.rl_step_memory({args.rl_model!r}, {K}, {args.rl_batch}, "
                        f"{ckpt}, torch.device('cpu')))")
                res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                     cwd=os.path.dirname(os.path.abspath(__file__)))
                if res.returncode:
                    raise RuntimeError(res.stderr[-2000:])
                mib = float(res.stdout.strip().splitlines()[-1])
            rows.append({"num_iter": K, "checkpoint_steps": ckpt, "peak_mib": mib})
            print(f"RL step, K={K:3d}, per-step checkpointing {str(ckpt):5s}: peak +{mib:8.1f} MiB")
    return {"rl_model": args.rl_model, "rl_batch": args.rl_batch, "rl_memory": rows}


def gsim_step_peak(model_name, batch, flags, device):
    """Peak memory (GiB) of one GSIM step (distill_gsim.gsim_step: contexts, student, generator loss, aux updates,
    optimizer states created) at `batch` images with the mask ratio forced to 1 (every token generated: the worst
    case), random weights. CUDA: max allocated. CPU: peak resident set of this (fresh) process above what it held
    after `import torch`, i.e. weights + optimizer states + activations, not the interpreter."""
    import distill_gsim
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    torch.manual_seed(0)
    args = distill_gsim.get_args(["--teacher", "-", "--cached-path", "-", "--out-dir", "-", "--model", model_name,
                                  "--mask-ratio", "1"] + list(flags))
    teacher = build(model_name).to(device).eval().requires_grad_(False)
    student, head, ema, aux, trainable, opt_g, opt_a = distill_gsim.build_gsim(teacher, args)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    h = w = teacher.seq_h * teacher.patch_size
    latents = torch.randn(batch, teacher.vae_embed_dim, h, w, device=device)
    labels = torch.arange(batch, device=device) % teacher.class_num
    gen = torch.Generator(device).manual_seed(0)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    distill_gsim.gsim_step(teacher=teacher, student_head=head, aux=aux, latents=latents, labels=labels, opt_g=opt_g,
                           opt_a=opt_a, args=args, gen=gen, trainable=trainable, precision=precision, student=student)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 30
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 2 ** 20  # KiB -> GiB


def gsim_memory(args, device):
    """Peak of one GSIM step at each of `--batches` (>= 2 sizes), and the straight line through them extrapolated
    to `--per-gpu` images: predicted_peak_gib. Each point runs in a fresh process (CPU peaks only grow)."""
    if len(args.batches) < 2:
        raise ValueError("--gsim-memory needs at least two --batches to fit a line")
    flags = args.gsim_flags.split()
    points = []
    for b in args.batches:
        if device.type == "cuda":
            gib = gsim_step_peak(args.model, b, flags, device)
            torch.cuda.empty_cache()
        else:
            code = f"import bench, torch; print(bench.gsim_step_peak({args.model!r}, {b}, {flags!r}, torch.device('cpu')))"
            res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                 cwd=os.path.dirname(os.path.abspath(__file__)))
            if res.returncode:
                raise RuntimeError(res.stderr[-3000:])
            gib = float(res.stdout.strip().splitlines()[-1])
        points.append({"batch": b, "peak_gib": gib})
        print(f"GSIM step, {args.model}, batch {b:3d}, mask ratio 1, flags [{args.gsim_flags}]: peak {gib:.2f} GiB")
    # least-squares line peak = a + slope * batch
    n = len(points)
    mb, mp = sum(p["batch"] for p in points) / n, sum(p["peak_gib"] for p in points) / n
    slope = sum((p["batch"] - mb) * (p["peak_gib"] - mp) for p in points) / sum((p["batch"] - mb) ** 2 for p in points)
    fixed = mp - slope * mb
    return {"model": args.model, "device": str(device), **common.machine(device), "flags": args.gsim_flags,
            "mask_ratio": 1.0, "points": points, "fixed_gib": fixed, "gib_per_image": slope,
            "per_gpu": args.per_gpu, "predicted_peak_gib": fixed + slope * args.per_gpu}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mar_tiny", choices=list(mar.PRESETS) + ["toy"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--num-iter", type=int, default=16, help="AR iterations K")
    p.add_argument("--cfg", type=float, default=2.9, help="teacher CFG (MAR-B 2.9, L 3.0, H 3.2)")
    p.add_argument("--num-diffusion-steps", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rl-memory", type=int, nargs="*", default=None, help="K values for the RL-step memory table")
    p.add_argument("--rl-model", default="toy", choices=list(mar.PRESETS) + ["toy"])
    p.add_argument("--rl-batch", type=int, default=4)
    p.add_argument("--gsim-memory", action="store_true", help="peak memory of one GSIM step, extrapolated")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2], help="--gsim-memory: measured batch sizes")
    p.add_argument("--per-gpu", type=int, default=64, help="--gsim-memory: batch to predict (paper: 64 per GPU)")
    p.add_argument("--gsim-flags", default="--grad-checkpointing", help="--gsim-memory: distill_gsim.py flags")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.gsim_memory:
        out = gsim_memory(args, device)
    else:
        out = rl_memory(args, device) if args.rl_memory else speed(args, device)
    return print_and_save(out, args.json)


if __name__ == "__main__":
    main()
