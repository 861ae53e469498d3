"""The run machinery every stage shares: processes, logs, checkpoints, EMA, seeds. No math lives here.

mar.py is the model, its diffusion and its samplers; this file is what a training or sampling script needs around
them (nanochat keeps `gpt.py` apart from `common.py` the same way):

  - `setup_distributed` / `cleanup_distributed`: one guarded DDP block. Under torchrun (RANK and WORLD_SIZE set) a
    process group is initialised, nccl on GPU and gloo on CPU; otherwise the script is one process and every
    collective below is a no-op.
  - `all_reduce_grads`: DDP's gradient averaging, by hand, for modules that are not called through one forward.
  - `assert_ranks_agree`: the end-of-run check that every rank holds rank 0's weights.
  - `is_main` / `print0` / `RunLog`: output on rank 0 only (one line per log interval, plus OUT_DIR/log.jsonl).
  - `start_run`: the common start of a stage (process group, per-rank batch, output folder).
  - `save_checkpoint`: atomic writes (temporary file, then rename). Reading lives in mar.py (`read_checkpoint`).
  - `ema_decay` / `update_ema`: the EMA of the weights that every tool loads.
  - `step_seed`: one seed per (run, rank, step), which makes resume exact without saving RNG state.

Every function depends only on torch and its arguments; copy any one of them on its own.
"""
import json
import os
import time

import torch
import torch.distributed as dist
from tqdm import tqdm


# ==== Processes: set-up, teardown, gradient averaging, agreement ===================================================

def setup_distributed(device=None):
    """torchrun -> init the process group (nccl on GPU, gloo on CPU); otherwise one process.

    Returns (rank, world_size, device). Every collective in the scripts sits behind `dist.is_initialized()`.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", 0))
        if device.type == "cuda":
            torch.cuda.set_device(local)
            device = torch.device("cuda", local)
        # Before init: torch.optim imports torch._dynamo -> torch.distributed._shard, which, imported after init,
        # keeps the group alive past destroy (torch 2.14); gloo threads then outlived it and sometimes aborted at exit.
        import torch._dynamo as _dynamo  # noqa: F401  (`as`: a bare import would shadow the name torch here)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return rank, world, device
    return 0, 1, device


def cleanup_distributed():
    if dist.is_initialized():
        dist.barrier()  # no rank tears the group down while another is still in a collective (gloo aborts)
        dist.destroy_process_group()


@torch.no_grad()
def all_reduce_grads(params, bucket=2 ** 25):
    """Average .grad over ranks (what DDP does in backward), in flat buckets of ~`bucket` elements.

    Used where the trained module is not called through one forward (GSIM's heads, RL's sampler), so a DDP
    wrapper's hooks would not fire. A no-op in a single process.
    """
    if not dist.is_initialized():
        return
    grads = [p.grad for p in params if p.grad is not None]
    world = dist.get_world_size()
    while grads:
        n, chunk = 0, []
        while grads and (n == 0 or n + grads[0].numel() <= bucket):
            n += grads[0].numel()
            chunk.append(grads.pop(0))
        flat = torch.cat([g.reshape(-1) for g in chunk])  # (sum of numel,)
        dist.all_reduce(flat)
        flat /= world
        for g, v in zip(chunk, flat.split([g.numel() for g in chunk])):
            g.copy_(v.view_as(g))


@torch.no_grad()
def assert_ranks_agree(model):
    """DDP sanity check at the end of every training run: every rank holds exactly rank 0's weights (per-tensor sum
    and sum of squares, float64); raises on any difference, a no-op in a single process."""
    if not dist.is_initialized():
        return
    params = list(model.parameters())
    mine = torch.stack([torch.stack([p.double().sum(), p.double().square().sum()]) for p in params])  # (P, 2)
    ref = mine.clone()
    dist.broadcast(ref, src=0)
    bad = (mine != ref).any(dim=1).nonzero().flatten().tolist()
    if bad:
        names = [n for i, (n, _) in enumerate(model.named_parameters()) if i in bad]
        raise RuntimeError(f"rank {dist.get_rank()} weights differ from rank 0 in {len(bad)} tensors, e.g. {names[:3]}")
    print0(f"ranks agree: all {dist.get_world_size()} processes hold identical weights ({len(params)} tensors)")


# ==== Output on rank 0: print, the start of a run, the run log ===================================================

def is_main():
    return not dist.is_initialized() or dist.get_rank() == 0


def print0(*args, **kw):
    """print on rank 0 only (without replacing the builtin)."""
    if is_main():
        print(*args, **kw, flush=True)


def start_run(args):
    """The common start of every stage: process group, per-rank batch (asserted to divide), output folder.
    Returns (rank, world, device, per-rank batch)."""
    rank, world, device = setup_distributed(args.device)
    if args.global_batch_size % world:
        raise ValueError(f"--global-batch-size {args.global_batch_size} is not divisible by {world} processes")
    os.makedirs(args.out_dir, exist_ok=True)
    print0(f"out dir: {os.path.abspath(args.out_dir)}; {world} process(es) on {device}, "
           f"batch {args.global_batch_size // world} each")
    return rank, world, device, args.global_batch_size // world


class RunLog:
    """Rank 0's tqdm bar and log.jsonl: `add(stats)` every step, `flush(step, **extra)` at each log interval
    (one averaged record, printed as one line and appended to OUT_DIR/log.jsonl). Silent on other ranks."""

    def __init__(self, out_dir, total, initial, desc, batch=None):
        self.on, self.batch, self.window, self.t0 = is_main(), batch, [], time.time()
        if self.on:
            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)
            self.file = open(os.path.join(out_dir, "log.jsonl"), "a")

    def add(self, stats):
        self.window.append(stats)
        if self.on:
            self.bar.update(1)

    def flush(self, step, **extra):
        rec = {k: sum(s[k] for s in self.window) / len(self.window) for k in self.window[0]} if self.window else {}
        rec.update(step=step, sec_per_step=(time.time() - self.t0) / max(1, len(self.window)), **extra)
        if self.batch:
            rec["img_per_sec"] = self.batch / rec["sec_per_step"]
        self.write(rec)
        self.window, self.t0 = [], time.time()
        return rec

    def write(self, rec):
        if self.on:
            self.bar.write(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in rec.items()))
            self.file.write(json.dumps(rec) + "\n")
            self.file.flush()

    def close(self):
        if self.on:
            self.bar.close()
            self.file.close()


# ==== State: atomic checkpoints, EMA, per-step seeds ==============================================================

def save_checkpoint(path, obj):
    """Atomic save: write a temporary file in the same folder, then rename over `path` (a crash never leaves a
    half-written checkpoint, and a failed save never destroys the previous good one)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def ema_decay(rate, step, warmup=True):
    """EMA decay after `step` optimizer steps: min(rate, (1 + step) / (10 + step)) with warm-up, else `rate`.

    A fixed 0.9999 keeps 1 - 0.9999^n of the updates made in n steps: 3% after 315 steps, 63% after 10,000. With the
    warm-up the EMA follows the weights closely early on (0.5 at step 8, 0.99 at step 890) and is the plain 0.9999
    EMA from step ~90,000 on, so a short run still shows in `model_ema`, which every tool loads.
    """
    return min(rate, (1 + step) / (10 + step)) if warmup else rate


@torch.no_grad()
def update_ema(ema_model, model, decay):
    """ema = decay * ema + (1 - decay) * param, parameter by parameter (MAR keeps no buffers)."""
    for e, p in zip(ema_model.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1.0 - decay)


def step_seed(seed, rank, step):
    """One seed per (run seed, rank, step). The scripts re-seed their generators every step from it, so a run
    resumed at step n draws exactly what the uninterrupted run drew, with no RNG state to save."""
    return (seed * 1_000_003 + rank * 7_919 + step) % (2 ** 63)
