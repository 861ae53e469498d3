"""Speed and memory: MAR teacher vs MARVAL student sampling, the paper's sizes without a GPU, and launch counts.

Speed (the default; random weights: the work does not depend on the values), at the same architecture, batch and K:
  * teacher = MAR's sampler: a 100-step diffusion head per token, CFG with the batch doubled (linear 2.9 for MAR-B),
  * student = MARVAL's sampler: one head call per token, cfg 1 (no doubled batch),
  * lower bound = K encoder+decoder passes at the same batch with no head and no CFG: the time a one-step student
    cannot go below without touching the transformer. student / lower bound near 1 means the head is no longer the
    bottleneck; MARVAL's speed-up then comes from removing 100 head steps AND the CFG doubling.
CPU by default (threads: torch's default, printed), CUDA when present with bf16 autocast.

--dry-run: ONE real step of every stage of `--model` at its README command's settings, on fake tensors (shapes, no
storage): teacher training and GSIM (64 per GPU, mask ratio 1) with and without --grad-checkpointing, RL (2 per GPU,
K = 64, the KL-16 decoder and PickScore's ViT-H/14 or, --rl-reward imagereward, ImageReward in the graph), teacher
(K = 256, CFG) and student sampling (K = 64, 128) at sample.py's batch, the FID Inception at evaluate.py's. Each runs
its script's function (train_step, gsim_step, rl_step, sample.generate); the table gives per GPU the parameters,
gradients, optimizer state and activations at the peak, the peak, whether it fits 80 GB (LiveMemory's section says
what it leaves out), the FLOPs by precision, the launches, and by the time model seconds a step and hours of the
README command on 8 A100s / H100s. Minutes a model on 2 cores: teacher sampling runs --head-steps (2) of the head's
100 reverse steps per AR step (the same memory each; the time model extrapolates to 100).

--launch-counts: kernel launches per image at batch 1 of the teacher and the student sampler (see that section).
--calibrate: the time model's fit on published times. --tf32-check: GSIM's Delta under emulated TF32 vs bf16.

    python bench.py                                   # mar_tiny, batch 1, K 16
    python bench.py --model mar_base --batch 1 --num-iter 64 --json bench_base_cpu.json
    python bench.py --model mar_huge --batch 64 --num-iter 64 --device cuda
    python bench.py --dry-run --model mar_huge --json dry_h.json     # does every stage fit an 80 GB GPU?
    python bench.py --dry-run --model mar_base --stages rl --rl-num-iter 16
    python bench.py --dry-run --model mar_base --stages rl --rl-reward imagereward   # RL with ImageReward's graph
    python bench.py --launch-counts --model mar_base --json launches_b.json
    python bench.py --dry-run --model mar_base --stages sample_teacher sample_student --batch-sweep   # batches 16-1024
    python bench.py --calibrate --json calibration.json && python bench.py --tf32-check --model mar_base
"""
import argparse
import contextlib
import copy
import itertools
import math
import time
import weakref

import torch
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode

import common
import data
import evaluate
import mar
import rewards

aten = torch.ops.aten  # the operators the dispatch modes below see


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
        model.conditions(tokens, mask, model.class_emb(labels), n_masked=n_masked)
        n_masked -= n_pred
        mask = torch.zeros_like(mask).scatter(1, orders[:, :n_masked], 1.0)


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
        t = timed(lambda: run(cfg=args.cfg, head=mar.HeadSampler(steps=args.num_diffusion_steps)), device, args.repeats)
        out["teacher_sec_per_image"] = t / args.batch
        if device.type == "cuda":
            out["teacher_peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2 ** 30
            torch.cuda.reset_peak_memory_stats()
        t = timed(lambda: run(head=mar.HeadSampler(one_step=True)), device, args.repeats)
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



# ==== Dry run: one real step of every stage at the paper's sizes, on tensors without storage ======================
#
# FakeTensorMode (torch._subclasses.fake_tensor) gives every tensor a shape, a dtype and a device but no memory, and
# runs the real operators' shape logic: MAR-H builds in about a second and a step of it runs on a laptop. LiveMemory
# counts the storage those tensors would hold. What is counted is what a GPU's allocator is asked for as tensors; NOT
# counted: the caching allocator's fragmentation and rounding, the CUDA context (~0.5-1 GiB a process), cuBLAS and
# cuDNN workspaces, the attention kernel's scratch, NCCL buffers, and autocast's cached bf16 weight copies (half the
# fp32 weights of a module under autocast whose parameters require grad; CPU fake tensors keep none).

KINDS = ("parameters", "gradients", "optimizer", "activations")
GIB = 2 ** 30
FIT_GIB = 72.0  # "fits an 80 GB GPU": a counted peak within 90% of 80 GiB, the rest for what the count leaves out
# CFG scales of the released MAR models (MAR arXiv:2406.11838 Table 4 / its README): the teacher's sampling setting.
MAR_CFG = {"mar_base": 2.9, "mar_large": 3.0, "mar_huge": 3.2}
# PickScore_v1 is a CLIP ViT-H/14 (the config.json of yuvalkirstain/PickScore_v1): built with fake weights, no file.
PICKSCORE_CONFIG = dict(
    text_config=dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                     num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu"),
    vision_config=dict(image_size=224, patch_size=14, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                       num_attention_heads=16, hidden_act="gelu"),
    projection_dim=1024)


class LiveMemory(TorchDispatchMode):
    """Bytes of live tensor storage by kind, and the peak of their sum, over the operators run inside it.

    Every storage an operator returns counts from its creation until Python frees it (a weakref callback); views
    share their base's storage and add nothing. Kinds: "parameters" and buffers of the modules given, "gradients"
    (a parameter's .grad, moved there when autograd accumulates it), "optimizer" (what an optimizer step creates and
    keeps: its states) and "activations" (everything else: tensors saved for backward, temporaries, inputs, outputs).
    A small stand-in for torch's MemTracker, which refuses a module called twice at the top level (every AR loop)
    and an optimizer step inside a tracked forward. Run inside FakeTensorMode, nothing is allocated.
    """

    def __init__(self, modules=(), optimizers=()):
        super().__init__()
        self.live, self.now = {}, dict.fromkeys(KINDS, 0)
        self.peak, self.at_peak, self.kind = 0, dict(self.now), "activations"
        for m in modules:
            for t in itertools.chain(m.parameters(), m.buffers()):
                self.track(t, "parameters")
            for p in m.parameters():
                if p.requires_grad:
                    p.register_post_accumulate_grad_hook(lambda p: self.track(p.grad, "gradients"))
        for opt in optimizers:  # states created inside step() are the optimizer's; its temporaries die inside it
            for t in pytree.tree_leaves(list(opt.state.values())):
                if isinstance(t, torch.Tensor):
                    self.track(t, "optimizer")
            opt.register_step_pre_hook(lambda *_: setattr(self, "kind", "optimizer"))
            opt.register_step_post_hook(lambda *_: setattr(self, "kind", "activations"))

    def track(self, t, kind):
        """Count t's storage as `kind` (a storage already counted changes kind: a gradient autograd made)."""
        st = t.untyped_storage()
        key = st._cdata  # the storage's address: one entry per storage, whatever views point at it
        if key in self.live:
            ref, nbytes, old = self.live[key]
            self.now[old] -= nbytes
        else:
            ref, nbytes = weakref.ref(st, lambda _, key=key: self.free(key)), st.nbytes()
        self.live[key] = (ref, nbytes, kind)
        self.now[kind] += nbytes
        total = sum(self.now.values())
        if total > self.peak:
            self.peak, self.at_peak = total, dict(self.now)

    def free(self, key):
        _, nbytes, kind = self.live.pop(key)
        self.now[kind] -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in self.live:  # in-place: counted
                self.track(t, self.kind)
        return out


def _like_gpu(opt):
    """The optimizer as it runs on a GPU: the foreach implementation (torch's default there), whose temporaries are
    lists of parameter-sized tensors."""
    for group in opt.param_groups:
        group["foreach"] = True
    return opt


def _steady_state(optimizers):
    """Create the optimizers' states (a step on zero gradients): every step after a run's first holds them through
    its forward and backward, so the dry run counts such a step."""
    for opt in optimizers:
        for group in opt.param_groups:
            for p in group["params"]:
                p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad(set_to_none=True)


def _gens(n):
    return [torch.Generator().manual_seed(i) for i in range(n)]


def _kl16():
    import vae
    return data.Tokenizer(vae.AutoencoderKL().eval().requires_grad_(False))


def _stage_train(name, opts):
    """train_mar.py's step at MAR's 64 images per GPU (or `opts["batch"]`), mask ratio `opts["mask_ratio"]`, with
    --grad-checkpointing when `opts["ckpt"]`, and the head `opts["head"]` = (depth, width) if given."""
    import train_mar
    flags = ["--grad-checkpointing"] if opts["ckpt"] else []
    flags += ["--diffloss-d", str(opts["head"][0]), "--diffloss-w", str(opts["head"][1])] if "head" in opts else []
    args = train_mar.get_args(["--model", name, "--cached-path", "-", "--out-dir", "-"] + flags)
    model = train_mar.build_model(args).train()
    ema = copy.deepcopy(model).requires_grad_(False)  # train_mar.py keeps an EMA of the whole model
    opt = _like_gpu(train_mar.build_optimizer(model, 1e-4, args.weight_decay))
    B = opts.get("batch", args.global_batch_size // 32)  # MAR's recipe: 2048 on 32 GPUs (README: 512 on 8), 64 per GPU
    latents, labels = torch.randn(B, model.vae_embed_dim, model.seq_h, model.seq_w), torch.arange(B)
    run = lambda: train_mar.train_step(model, opt, latents, labels, torch.Generator().manual_seed(0), "bf16",
                                       args.grad_clip, mask_ratio=opts["mask_ratio"])
    return run, [model, ema], [opt], B, None, args.epochs * (IMAGENET // 512)  # README: --global-batch-size 512


def _stage_gsim(name, opts):
    """distill_gsim.py's step (generator update + aux updates) at the paper's 64 per GPU, mask ratio
    `opts["mask_ratio"]` (the dry run: 1, the worst case)."""
    import distill_gsim
    flags = ["--grad-checkpointing"] if opts["ckpt"] else []
    args = distill_gsim.get_args(["--teacher", "-", "--cached-path", "-", "--out-dir", "-", "--model", name,
                                  "--mask-ratio", str(opts.get("mask_ratio", 1.0))] + flags)
    teacher = mar.PRESETS[name]().eval().requires_grad_(False)
    nets = distill_gsim.build_gsim(teacher, args)
    B = args.global_batch_size // 8
    latents, labels = torch.randn(B, teacher.vae_embed_dim, teacher.seq_h, teacher.seq_w), torch.arange(B)
    nets.opt_g, nets.opt_a = _like_gpu(nets.opt_g), _like_gpu(nets.opt_a)
    run = lambda: distill_gsim.gsim_step(nets, latents, labels, torch.Generator().manual_seed(0), args, "bf16")
    return (run, [teacher, nets.head, nets.ema, nets.aux], [nets.opt_g, nets.opt_a], B, None,
            args.epochs * (IMAGENET // args.global_batch_size))


def _stage_rl(name, opts):
    """rl_refine.py's step at the paper's 2 per GPU: K AR steps of the one-step head with gradients (each step
    checkpointed), the KL-16 decoder and PickScore's ViT-H/14 (or ImageReward, opts["reward"]), backward, AdamW."""
    import rl_refine
    from transformers import BatchEncoding, CLIPConfig, CLIPModel
    args = rl_refine.get_args(["--student", "-", "--vae", "-", "--out-dir", "-", "--model", name,
                               "--pickscore-model", "-", "--num-iter", str(opts["num_iter"])])
    args.precision = "bf16"
    policy = mar.PRESETS[name]().eval()
    reference, ema = copy.deepcopy(policy).requires_grad_(False), copy.deepcopy(policy).requires_grad_(False)
    opt = _like_gpu(torch.optim.AdamW(list(policy.parameters()), lr=args.lr))
    tokenizer = _kl16()
    if opts.get("reward") == "imagereward":  # ImageReward-v1.0 at its real size; 35 token ids for each of 1000 prompts
        ids = torch.zeros(1000, rewards.IMAGEREWARD_TOKENS, dtype=torch.long)
        reward = rewards.ImageRewardScore(rewards.ImageReward(**rewards.IMAGEREWARD_CONFIG), ids, torch.ones_like(ids))
    else:
        # text inputs of PickScore's tokenizer: 77 token ids a prompt (their values do not change any shape)
        tokenize = lambda texts: BatchEncoding({"input_ids": torch.zeros(len(texts), 77, dtype=torch.long),
                                                "attention_mask": torch.ones(len(texts), 77, dtype=torch.long)})
        reward = rewards.PickScoreReward(CLIPModel(CLIPConfig(**PICKSCORE_CONFIG)), tokenize, 224,
                                         prompts=["x"] * 1000)
        reward.text_features(torch.arange(1))  # the 1,000 prompts' features: encoded on the first step only, kept
    B = args.global_batch_size // 8
    labels = torch.arange(B)
    run = lambda: rl_refine.rl_step(policy, reference, tokenizer, reward, labels, _gens(B), opt, args)
    return run, [policy, reference, ema, tokenizer.vae, reward], [opt], B, args.num_iter, rl_refine.run_length(args)


def _stage_sample(name, opts):
    """sample.py's batch (its --batch-size, 256 per GPU, or `opts["batch"]`): the teacher (CFG, `head_steps` of the
    head's reverse steps) or the one-step student, then the KL-16 decoder, in bf16 as on a GPU."""
    import sample
    flags = ["--one-step"] if opts["student"] else ["--cfg", str(MAR_CFG.get(name, 2.9)), "--num-diffusion-steps",
                                                     str(opts["head_steps"])]
    flags += ["--batch-size", str(opts["batch"])] if "batch" in opts else []
    args = sample.get_args(["--ckpt", "-", "--vae", "-", "--out-dir", "-", "--model", name, "--num-iter",
                            str(opts["num_iter"])] + flags)
    model, tokenizer = mar.PRESETS[name]().eval(), _kl16()
    B = args.batch_size
    labels = torch.arange(B) % model.class_num
    run = lambda: sample.generate(model, tokenizer, labels, _gens(B), args, "bf16")
    return run, [model, tokenizer.vae], [], B, args.num_iter, -(-args.num_images // (8 * B))  # batches a GPU runs


def _stage_inception(name, opts):
    """The FID Inception at evaluate.py's --batch-size (50) on 256 x 256 uint8 images, as inception_features runs."""
    net, B = evaluate.FIDInception().eval(), 50
    images = torch.zeros(B, 3, 256, 256, dtype=torch.uint8)

    def run():
        with torch.no_grad():  # as in inception_features
            return net(images)
    return run, [net], [], B, None, 50_000 // B  # evaluate.py: one process


STAGES = {"train": _stage_train, "train_ckpt": _stage_train, "gsim": _stage_gsim, "gsim_ckpt": _stage_gsim,
          "rl": _stage_rl, "sample_teacher": _stage_sample, "sample_student": _stage_sample,
          "inception": _stage_inception}


def _count(stage, name, opts, memory=True):
    """One step of `stage` under WorkCount (+ LiveMemory): (meter or None, work, per-GPU batch, K, README steps)."""
    with FakeTensorMode() as mode:
        mode.__deepcopy__ = lambda memo: mode  # copy.deepcopy of a fake module (EMA, reference) keeps this mode
        torch.manual_seed(0)
        run, modules, optimizers, batch, num_iter, steps = STAGES[stage](name, opts)
        _steady_state(optimizers)
        meter, counter = LiveMemory(modules, optimizers) if memory else None, WorkCount()
        with meter or contextlib.nullcontext(), counter:
            run()
    return meter, counter.work(), batch, num_iter, steps


def dry_stage(stage, name, **opts):
    """One stage of model `name` under FakeTensorMode + LiveMemory + WorkCount: a row of the dry-run table (sizes in
    GiB; FLOPs and launches of the step run; seconds and hours of the README command by the time model)."""
    t0 = time.time()
    meter, work, batch, num_iter, steps = _count(stage, name, opts)
    row = {"stage": stage, "per_gpu_batch": batch, "num_iter": num_iter}
    row.update({f"{k}_gib": meter.at_peak[k] / GIB for k in KINDS})
    row.update(peak_gib=meter.peak / GIB, fits_80gb=meter.peak / GIB <= FIT_GIB)
    avg = average_work(stage, name, opts, work)
    row.update(flops_per_step={p: work[p] for p in PRECISIONS}, launches_per_step=work["launches"], work_average=avg,
               readme_steps=steps, seconds_per_step={gpu: step_seconds(avg, gpu) for gpu in PEAK})
    row["hours"] = {gpu: steps * sec / 3600 for gpu, sec in row["seconds_per_step"].items()}
    if avg["fp32"]:  # GSIM's fp32 teacher / aux head calls: the same with TF32 allowed
        row["hours_tf32"] = {gpu: steps * step_seconds(avg, gpu, tf32=True) / 3600 for gpu in PEAK}
    row["seconds"] = time.time() - t0
    return row


def dry_run(args):
    """The dry-run table of `args.model`: every stage at the settings of its README command."""
    K = args.num_iter  # None: each sampling stage's own K
    plan = [("train", dict(mask_ratio=1.0, ckpt=False)), ("train_ckpt", dict(mask_ratio=1.0, ckpt=True)),
            ("gsim", dict(mask_ratio=1.0, ckpt=False)), ("gsim_ckpt", dict(mask_ratio=1.0, ckpt=True)),
            ("rl", dict(num_iter=args.rl_num_iter, reward=args.rl_reward)),
            ("sample_teacher", dict(student=False, num_iter=K or 256, head_steps=args.head_steps)),
            ("sample_student", dict(student=True, num_iter=K or 64)),
            ("sample_student", dict(student=True, num_iter=K or 128)), ("inception", {})]
    rows = []
    for stage, opts in plan:
        if args.stages and stage not in args.stages:
            continue
        rows.append(dry_stage(stage, args.model, **opts))
        r = rows[-1]
        print(f"{stage:15s} batch {r['per_gpu_batch']:3d} K {str(r['num_iter']):>4s}  params {r['parameters_gib']:6.2f}"
              f"  grads {r['gradients_gib']:6.2f}  optim {r['optimizer_gib']:6.2f}  act {r['activations_gib']:7.2f}"
              f"  peak {r['peak_gib']:7.2f} GiB  {'fits' if r['fits_80gb'] else 'DOES NOT FIT'} 80 GB"
              f"  ({r['seconds']:.0f} s)", flush=True)
        a, h = r["seconds_per_step"], r["hours"]
        f = " + ".join(f"{r['flops_per_step'][p] / 1e12:.1f}" for p in PRECISIONS)
        print(f"{'':15s} {f} TFLOP (bf16 + tf32 + fp32), {r['launches_per_step']} launches; mean mask ratio, this K: "
              f"{a[A100]:.3g} / {a[H100]:.3g} s a step, x {r['readme_steps']} = {h[A100]:.4g} / {h[H100]:.4g} h "
              f"(A100 / H100)", flush=True)
    return {"model": args.model, "device": "fake (no storage), bf16 autocast", "fit_gib": FIT_GIB,
            "teacher_head_steps_run": args.head_steps, "rl_reward": args.rl_reward,
            "time_model": {"peak": PEAK, "u": U, "t_launch": T_LAUNCH},
            "stages": rows, "batch_sweep": batch_sweep(args.model, rows) if args.batch_sweep else None}


# ==== Launch counts: a GPU-free model of batch-1 latency ==========================================================
#
# At batch 1 a GPU runs MAR's small kernels far below its throughput: each operator is a kernel launch of a few
# microseconds, so time ~ launches. The sampler is shape-static (every AR step runs the same operators whatever its
# token count), so launches per image = a + K (b + S c) for the teacher (K AR steps, S head steps each) and a + K b'
# for the student: three counts at small K and S give a, b, c exactly, and a fourth count checks the model.

class LaunchCount(TorchDispatchMode):
    """Counts the operators that launch a GPU kernel: every aten operator except views, metadata queries (prim::),
    bare allocations and host-side scalar reads."""
    FREE = {"empty", "empty_like", "empty_strided", "new_empty", "lift_fresh", "lift_fresh_copy", "_local_scalar_dense"}

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not (func.is_view or func.namespace == "prim" or func._opname in self.FREE):
            self.n += 1
        return func(*args, **(kwargs or {}))


def launch_counts(name, cfg):
    """Kernel launches per image at batch 1 (fp32, no autocast): teacher (CFG `cfg`, 100 head steps) at K = 64 and
    256, student (one head call, cfg 1) at K = 64 and 128, per-AR-step terms, and the teacher / student ratios."""
    with FakeTensorMode():
        model, label = mar.PRESETS[name]().eval(), torch.tensor([1])

        def count(num_iter, head, cfg=1.0):
            model.diffloss.gen_diffusion(head.steps)  # the respaced process is built once, on first use: not per image
            with torch.no_grad(), LaunchCount() as c:
                model.sample_tokens(1, num_iter, cfg, labels=label, head=head,
                                    generator=torch.Generator().manual_seed(0))
            return c.n

        teacher = lambda K, S: count(K, mar.HeadSampler(steps=S), cfg)
        student = lambda K: count(K, mar.HeadSampler(one_step=True))
        t22, t24, t42, s2, s4 = teacher(2, 2), teacher(2, 4), teacher(4, 2), student(2), student(4)
        c = (t24 - t22) // 4                   # one head step (guided: CFG on eps) + one reverse-diffusion update
        b = (t42 - t22) // 2 - 2 * c           # the rest of a teacher AR step: transformer (CFG batch), noise, writes
        a = t22 - 2 * b - 4 * c                # once per image: orders, buffers, unpatchify
        bs = (s4 - s2) // 2                    # a student AR step: transformer, one head call, writes
        as_ = s2 - 2 * bs
        if teacher(8, 5) != a + 8 * (b + 5 * c) or student(8) != as_ + 8 * bs:
            raise AssertionError("launch counts are not linear in K and S: the sampler's AR steps differ")
    out = {"model": name, "cfg": cfg, "per_image_fixed": {"teacher": a, "student": as_},
           "teacher_per_ar_step_without_head": b, "teacher_per_head_step": c, "student_per_ar_step": bs,
           "teacher": {K: a + K * (b + 100 * c) for K in (64, 256)}, "student": {K: as_ + K * bs for K in (64, 128)}}
    out["ratio"] = {f"teacher K={kt} / student K={ks}": out["teacher"][kt] / out["student"][ks]
                    for kt in (64, 256) for ks in (64, 128)}
    return out


# ==== Time model: seconds and hours of each stage from its FLOPs and launches, fitted on published times =========
#
# t_step = sum over precisions p of FLOPs_p / (peak_p u) + launches x t_launch     (docs/results.md, section 12)
# Matmuls, convolutions and attention run at a fraction u of the GPU's dense peak in their precision; the rest (norms,
# activations, copies, optimizer updates) is short memory-bound work, priced per kernel with the host's cost of a launch
# (Python, dispatch, the launch): t_launch. Dense peaks, FLOP/s without sparsity (NVIDIA's A100 and H100 SXM
# datasheets). PyTorch's defaults: fp32 matmuls at the fp32 peak (TF32 off), fp32 convolutions at the TF32 one.
A100, H100 = "A100-80GB", "H100-80GB"
PEAK = {A100: {"bf16": 312e12, "tf32": 156e12, "fp32": 19.5e12}, H100: {"bf16": 989e12, "tf32": 494e12, "fp32": 67e12}}
PRECISIONS = ("bf16", "tf32", "fp32")
U = {A100: 0.275, H100: 0.187}  # fitted by `python bench.py --calibrate` (docs/results.md, section 12)
T_LAUNCH = 11.2e-6
IMAGENET = 1_281_167  # ImageNet-1k's training images: an epoch


class WorkCount(LaunchCount):
    """LaunchCount's launches, and the FLOPs of matmuls, convolutions and attention (torch.utils.flop_counter's
    formulas) by the precision a GPU runs them in. On fp32 inputs (outside autocast): "fp32" for a matmul (GSIM's
    teacher and aux heads in the generator loss), "tf32" for a convolution (the FID Inception). "bf16": the rest,
    attention included: fake tensors on a CPU take attention's math path, in fp32, wherever the fused CPU kernel does
    not apply (dropout, the KL-16 decoder's head width 512); a GPU runs a flash / memory-efficient kernel in bf16."""
    FORMULAS = {**flop_counter.flop_registry,  # + the CPU attention kernel: a GPU's flash attention FLOPs
                aten._scaled_dot_product_flash_attention_for_cpu: flop_counter.sdpa_flop,
                aten._scaled_dot_product_flash_attention_for_cpu_backward: flop_counter.sdpa_backward_flop}

    def __init__(self):
        super().__init__()
        self.flops = dict.fromkeys(PRECISIONS, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        formula = self.FORMULAS.get(func._overloadpacket)
        if formula is not None:
            dtype = next(a for a in args if isinstance(a, torch.Tensor)).dtype
            batched = func._overloadpacket in (aten.bmm, aten.baddbmm)  # attention's math path, only
            p = "bf16" if dtype != torch.float32 or batched else "tf32" if "conv" in func.__name__ else "fp32"
            self.flops[p] += formula(*args, **(kwargs or {}), out_val=out)
        return out

    def work(self):
        return {**self.flops, "launches": self.n}


def step_seconds(work, gpu, tf32=False, u=None, t_launch=None):
    """The time model on `work` ({precision: FLOPs, "launches": n}), one `gpu`; tf32: fp32 matmuls at the TF32 peak."""
    at_u1 = sum(work[p] / PEAK[gpu]["tf32" if p == "fp32" and tf32 else p] for p in PRECISIONS)  # seconds at u = 1
    return at_u1 / (u or U[gpu]) + work["launches"] * (T_LAUNCH if t_launch is None else t_launch)


def mean_mask_ratio(stage):
    """Mean mask ratio of a step. MAR (train_mar.py): N(1, 0.25^2) on [0.7, 1] (mar.truncnorm_mask_ratio, the
    official code's scipy truncnorm), mean 0.867; GSIM: that, or U(0, 1] with probability --uniform-mask-prob (0.5)."""
    import distill_gsim, scipy.stats
    mar_mean = scipy.stats.truncnorm(a=(0.7 - 1) / 0.25, b=0, loc=1, scale=0.25).mean()
    p = distill_gsim.get_args(["--teacher", "-", "--cached-path", "-", "--out-dir", "-"]).uniform_mask_prob
    return float(mar_mean if stage.startswith("train") else p * 0.5 + (1 - p) * mar_mean)


def average_work(stage, name, opts, work):
    """`work`, one step of `stage` at `opts`, at the README command's average setting (K: the dry run's). Training
    and GSIM draw a mask ratio a step (the dry run: the worst, 1); their FLOPs are linear in the masked count (head
    rows, encoder tokens) but for the encoder's attention (a few %), so a step at the mean ratio has the mean work to
    a fraction of a percent: counted there. Teacher sampling runs S = --head-steps of the head's 100 reverse steps,
    all of the same shapes, so w(100) = w(S) + (100 - S)(w(S + 1) - w(S)) exactly."""
    if stage.startswith(("train", "gsim")) and opts.get("mask_ratio", 1.0) != mean_mask_ratio(stage):
        return _count(stage, name, {**opts, "mask_ratio": mean_mask_ratio(stage)}, memory=False)[1]
    if stage == "sample_teacher":
        more = _count(stage, name, {**opts, "head_steps": opts["head_steps"] + 1}, memory=False)[1]
        return {k: work[k] + (100 - opts["head_steps"]) * (more[k] - work[k]) for k in work}
    return work


# Published times, seconds a step (batch 1: an image): "fit" rows give the constants, "check" rows are kept out (the
# model's error on them is its test). MAR's released trainer runs the head on all 4 x 256 rows of an image, masked or
# not (ours: the masked ones, same loss), which its rows add (`published_work`). MARVAL gives no K for its timing:
# K = 128, its sampling setting, for both (docs/results.md, section 12, for K = 64 and 256).
PR7, MAR_README, FIG1 = "LTH14/mar PR #7", "LTH14/mar README", "MARVAL (arXiv:2511.15190) Fig. 1 / project page"
PUBLISHED = [  # (what, source, GPU, seconds, role, stage, model, opts)
    ("MAR-L (head 8 x 1280) training, 64 per GPU", PR7, A100, 0.78, "fit", "train", "mar_large", dict(ckpt=False)),
    ("MAR-B, batch 1: K 128, 100 head steps, CFG", FIG1, A100, 20.10, "fit", "sample_teacher", "mar_base",
     dict(student=False, num_iter=128, head_steps=2, batch=1)),
    ("MAR-L (head 3 x 1024) training, 128 per GPU, cached latents: 400 epochs in ~1d11h on 16 GPUs", MAR_README, H100,
     35 * 3600 / 250_000, "fit", "train", "mar_large", dict(ckpt=False, head=(3, 1024), batch=128)),
    ("MARVAL-B, batch 1: K 128, one head step", FIG1, A100, 0.61, "check", "sample_student", "mar_base",
     dict(student=True, num_iter=128, batch=1)),
    ("MAR-L (head 8 x 1280) training, 64 per GPU, grad checkpointing", PR7, A100, 0.94, "check", "train_ckpt",
     "mar_large", dict(ckpt=True)),
    ("MAR-H (head 12 x 1536) training, 64 per GPU, grad checkpointing", PR7, A100, 1.56, "check", "train_ckpt",
     "mar_huge", dict(ckpt=True)),
    ("MAR-L (head 3 x 1024) training, 64 per GPU, images encoded each step: 400 epochs in ~1d7h on 32 GPUs",
     MAR_README, H100, 31 * 3600 / 250_000, "check", "train", "mar_large", dict(ckpt=False, head=(3, 1024))),
]


def published_work(stage, name, opts):
    """The work of a PUBLISHED run at its average setting; training as the released trainer runs it, with the head
    on the unmasked rows too (~6 x the head's matmul weights a row: forward 2, backward 4)."""
    opts = {**opts, "mask_ratio": mean_mask_ratio(stage)} if stage.startswith("train") else opts
    _, work, batch, _, _ = _count(stage, name, opts, memory=False)
    work = average_work(stage, name, opts, work)
    if stage.startswith("train"):
        with torch.device("meta"):
            m = mar.PRESETS[name](**dict(zip(("diffloss_d", "diffloss_w"), opts.get("head", ()))))
        weights = sum(lin.weight.numel() for lin in m.diffloss.net.modules() if isinstance(lin, torch.nn.Linear))
        work["bf16"] += 6 * weights * m.diffusion_batch_mul * batch * (256 - math.ceil(256 * opts["mask_ratio"]))
    return work


def calibrate():
    """Fit the time model on PUBLISHED's "fit" rows; every row's model time and error. With x = 1 / u, each time is
    linear, t = a x + n t_launch (a: seconds at u = 1): the A100's FLOP-bound training step and launch-bound batch-1
    sampler give u(A100) and t_launch, then the H100 training figure u(H100) (no H100 figure is launch-bound)."""
    rows = []
    for what, source, gpu, published, role, stage, name, opts in PUBLISHED:
        work = published_work(stage, name, opts)
        rows.append(dict(what=what, source=source, gpu=gpu, published=published, role=role, model=name, work=work,
                         at_u1=step_seconds(work, gpu, u=1, t_launch=0)))
    (f1, f2), h = [r for r in rows if r["role"] == "fit" and r["gpu"] == A100], rows[2]
    n1, n2 = f1["work"]["launches"], f2["work"]["launches"]
    x = (f1["published"] * n2 - f2["published"] * n1) / (f1["at_u1"] * n2 - f2["at_u1"] * n1)
    t_launch = (f1["published"] - f1["at_u1"] * x) / n1
    u = {A100: 1 / x, H100: h["at_u1"] / (h["published"] - h["work"]["launches"] * t_launch)}
    for r in rows:
        r["model_seconds"] = step_seconds(r["work"], r["gpu"], u=u[r["gpu"]], t_launch=t_launch)
        r["error"] = r["model_seconds"] / r["published"] - 1
        print(f"{r['role']:5s} {r['gpu']} {r['published']:7.3f} s published, {r['model_seconds']:7.3f} s model "
              f"({100 * r['error']:+.1f}%): {r['what']} [{r['source']}]", flush=True)
    print(f"fit: u {u[A100]:.4f} (A100), {u[H100]:.4f} (H100); t_launch {1e6 * t_launch:.2f} us", flush=True)
    return {"u": u, "t_launch": t_launch, "figures": rows}


def batch_sweep(name, rows, batches=(16, 32, 64, 128, 256, 512, 1024)):
    """The dry run's sampling `rows` of `name` at other per-GPU batches: seconds an image (the time model) and peak
    GiB (at K = 2: K does not change it). FLOPs grow with the batch, and the launches by the noise drawn image by
    image: launches(B) = launches(B0) + (B - B0)(a + K b)."""
    out = {}
    for r in (r for r in rows if r["stage"].startswith("sample")):
        stage, K, B0, work = r["stage"], r["num_iter"], r["per_gpu_batch"], r["work_average"]
        count = lambda k, b, memory: _count(stage, name, dict(student=stage == "sample_student", head_steps=1,
                                                              num_iter=k, batch=b), memory)
        d2, d3 = [(count(k, batches[-1], False)[1]["launches"] - count(k, batches[0], False)[1]["launches"])
                  / (batches[-1] - batches[0]) for k in (2, 3)]  # launches an image adds at K = 2, 3: a + 2b, a + 3b
        per_image, table = d2 + (K - 2) * (d3 - d2), {}
        for B in batches:
            w = {**{p: work[p] * B / B0 for p in PRECISIONS}, "launches": work["launches"] + (B - B0) * per_image}
            table[B] = {"peak_gib": count(2, B, True)[0].peak / GIB, **{g: step_seconds(w, g) / B for g in PEAK}}
            print(f"{stage:15s} K {K:3d} batch {B:4d}: {table[B][A100]:.4f} s (A100) / {table[B][H100]:.4f} s (H100) "
                  f"an image, peak {table[B]['peak_gib']:.1f} GiB", flush=True)
        out[f"{stage} K={K}"] = table
    return out


# ==== TF32 for GSIM's fp32 teacher and aux heads, emulated on a CPU ===============================================
#
# GSIM's loss keeps only the direction of Delta = eps_p - eps_phi (MARVAL arXiv:2511.15190 sec. 3), ~1% of |eps| once
# the student converges, which bf16 turns: GeneratorLoss runs both heads in fp32. TF32 (10 of fp32's 23 mantissa bits
# in a matmul's factors, fp32 sums) runs at 8x (A100) / 7x (H100) the fp32 peak. Does it keep the direction?

def round_tf32(x):
    """fp32 `x` rounded to TF32's 10-bit mantissa, to nearest, ties away from zero (cvt.rna.tf32.f32): on the int32
    view, add half of the 13 dropped bits (0x1000), then clear them. A carry moves into the exponent, as it should."""
    return ((x.contiguous().view(torch.int32) + 0x1000) & ~0x1FFF).view(torch.float32)


class TF32Matmul(TorchDispatchMode):
    """Every fp32 mm, addmm, bmm and baddbmm (what nn.Linear and matmul run) on TF32-rounded factors: a CPU stand-in
    for a GPU with TF32 on. addmm's bias is added in fp32, as cuBLAS adds C."""
    FACTORS = {aten.mm: (0, 1), aten.bmm: (0, 1), aten.addmm: (1, 2), aten.baddbmm: (1, 2)}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        factors = self.FACTORS.get(func._overloadpacket, ())
        if factors and args[factors[0]].dtype == torch.float32:
            args = tuple(round_tf32(a) if i in factors else a for i, a in enumerate(args))
        return func(*args, **(kwargs or {}))


@torch.no_grad()
def tf32_check(net, rows=4096, targets=(0.04, 0.3), cfg=1.2, seed=0):
    """Cosine, token by token, of GSIM's Delta with TF32 matmuls and with bf16 autocast against fp32.

    net: a diffusion head given random weights at a trained head's scale (Linear N(0, 1/fan_in), biases N(0, 0.1^2),
    eps of unit variance). Teacher `net`; aux `net` with every weight moved by s x its spread, c_null = c + s x noise,
    s set so the median |Delta| is each `target` (0.04: converged; 0.3: early). x_t, c ~ N(0, I), t ~ U{20..980}, CFG
    `cfg`. Per target: the median |Delta|, and per precision the cosine's mean, 1% quantile and worst."""
    gen = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=gen)
    for m in (m for m in net.modules() if isinstance(m, torch.nn.Linear)):
        m.weight.copy_(randn(m.weight.shape) / m.in_features ** 0.5)
        m.bias.copy_(0.1 * randn(m.bias.shape))
    C, Dz = net.in_channels, net.cond_embed.in_features
    x, t, c, dc = randn(rows, C), torch.randint(20, 981, (rows,), generator=gen), randn(rows, Dz), randn(rows, Dz)
    net.final_layer.linear.weight /= net(x, t, c)[:, :C].std()  # eps of unit variance, as a trained head's
    aux, base = copy.deepcopy(net), [p.clone() for p in net.parameters()]
    moves = [randn(p.shape) * (p.std() if p.numel() > 1 else 0.0) for p in base]

    def delta(s, precision):  # (rows, C): Delta = eps_p - eps_phi with the heads' matmuls in `precision`
        for p, p0, dp in zip(aux.parameters(), base, moves):
            p.copy_(p0 + s * dp)
        with TF32Matmul() if precision == "tf32" else contextlib.nullcontext(), \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            eps_p = mar.guided_eps(net, x, t, c, c + s * dc, cfg)[:, :C]  # guided teacher (MARVAL Eq. 10), (rows, C)
            eps_phi = aux(x, t, c)[:, :C]                                 # aux, (rows, C)
        return eps_p.float() - eps_phi.float()                            # subtracted in fp32, as GSIM's loss does

    levels = []
    for target in targets:
        s = 1e-2
        for _ in range(2):  # |Delta| is about linear in s: two secant steps land within a few % of the target
            s *= target / delta(s, "fp32").norm(dim=1).median().item()
        ref = delta(s, "fp32")
        levels.append({"target": target, "median_abs_delta": ref.norm(dim=1).median().item()})
        for precision in ("tf32", "bf16"):
            cos = torch.nn.functional.cosine_similarity(delta(s, precision), ref, dim=1)  # (rows,)
            levels[-1][precision] = dict(mean=cos.mean().item(), p01=cos.quantile(0.01).item(), worst=cos.min().item())
        print(f"median |Delta| {levels[-1]['median_abs_delta']:.3f}, cosine with fp32 (mean, worst): " + "; ".join(
            f"{p} {levels[-1][p]['mean']:.6f}, {levels[-1][p]['worst']:.6f}" for p in ("tf32", "bf16")))
    return {"head": f"{len(net.res_blocks)} x {net.cond_embed.out_features}", "rows": rows, "cfg": cfg,
            "levels": levels}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mar_tiny", choices=list(mar.PRESETS) + ["toy"])
    p.add_argument("--json", default=None)
    g = p.add_argument_group("speed (default)")
    g.add_argument("--batch", type=common.COUNT, default=1)
    g.add_argument("--num-iter", type=common.COUNT, default=None,
                   help="AR iterations K (speed: default 16; --dry-run: overrides every sampling stage's K)")
    g.add_argument("--cfg", type=common.NONNEG, default=2.9, help="teacher CFG (MAR-B 2.9, L 3.0, H 3.2)")
    g.add_argument("--num-diffusion-steps", type=common.COUNT, default=100)
    g.add_argument("--repeats", type=common.COUNT, default=3)
    g.add_argument("--device", type=common.device_arg, default="cuda" if torch.cuda.is_available() else "cpu")
    g = p.add_argument_group("dry run (fake tensors, the paper's sizes)")
    g.add_argument("--dry-run", action="store_true", help="one step of every stage of --model, memory per GPU")
    g.add_argument("--stages", nargs="+", choices=list(STAGES), default=None, help="only these stages")
    g.add_argument("--rl-num-iter", type=common.COUNT, default=64, help="K of the RL step (paper: 64)")
    g.add_argument("--rl-reward", choices=["pickscore", "imagereward"], default="pickscore", help="RL's reward model")
    g.add_argument("--head-steps", type=common.COUNT, default=2, help="teacher sampling: head steps run an AR step")
    g.add_argument("--batch-sweep", action="store_true", help="also: sampling's seconds an image, batch 16 to 1024")
    g = p.add_argument_group("launch counts, time model, TF32")
    g.add_argument("--launch-counts", action="store_true", help="kernel launches per image at batch 1")
    g.add_argument("--calibrate", action="store_true", help="fit the time model on published times")
    g.add_argument("--tf32-check", action="store_true", help="GSIM's Delta with TF32 vs bf16 (the head of --model)")
    args = p.parse_args(argv)
    common.check_outputs([("--json", args.json)], [])  # its folder writable: checked before minutes of work
    if args.dry_run or args.launch_counts:
        if args.model not in MAR_CFG:
            p.error(f"--dry-run and --launch-counts take a released model (mar_base, mar_large, mar_huge), "
                    f"got --model {args.model}")
        out = dry_run(args) if args.dry_run else launch_counts(args.model, MAR_CFG[args.model])
    elif args.calibrate or args.tf32_check:
        out = calibrate() if args.calibrate else tf32_check(build(args.model).diffloss.net)
    else:
        args.num_iter = args.num_iter or 16
        out = speed(args, torch.device(args.device))
    return evaluate.print_and_save(out, args.json)


if __name__ == "__main__":
    common.cli(main)
