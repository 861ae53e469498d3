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
  - `UsageError`, `cli`, `number`, `input_path`, `reading`, `claim_out_dir`: a user's mistake is caught before any
    work and ends as one line on stderr with exit status 2, and no run writes over a checkpoint it did not make.
  - `save_checkpoint`: atomic writes (temporary file, then rename). Reading lives in mar.py (`read_checkpoint`).
  - `ema_decay` / `update_ema`: the EMA of the weights that every tool loads.
  - `step_seed`: one seed per (run, rank, step), which makes resume exact without saving RNG state.
  - `StepControl`: every rank stops (SIGTERM) and saves (a time cadence) at the same step.
  - `my_share` / `gather_indexed`: evaluation split over ranks and merged, so no rank works while others wait.
  - `machine`: what a timing ran on (CPU model, threads, matmul throughput), recorded beside every reported time.

The reports' figures are in figures.py. Every function depends only on torch and its arguments; copy any one of them
on its own.
"""
import argparse
import contextlib
import datetime
import errno
import hashlib
import json
import math
import os
import pickle
import signal
import sys
import time
import zipfile

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm


# ==== Processes: set-up, teardown, gradient averaging, agreement ===================================================

# How long a collective may wait for the slowest rank before the process group gives up (torch's NCCL default is 10
# minutes). No rank works alone inside a run while the others wait, except the main process writing a checkpoint
# between two steps (MAR-H's policy, EMA and optimizer state: ~15 GB), which a slow or shared file system can stretch
# past 10 minutes. `--dist-timeout` sets it.
DIST_TIMEOUT_MINUTES = 30


def setup_distributed(device=None, timeout_minutes=DIST_TIMEOUT_MINUTES):
    """torchrun -> init the process group (nccl on GPU, gloo on CPU) with a collective timeout of `timeout_minutes`;
    otherwise one process.

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
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=timeout_minutes))
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


def gather_indexed(pieces):
    """Merge work split over ranks: `pieces` {global index: tensor} made on this rank -> the concatenation, in index
    order, of every rank's pieces, on every rank (CPU tensors). One all_gather_object (pickled: for evaluation-sized
    data, toy images and per-image scores, not for 50,000 ImageNet images). A single process concatenates its own."""
    local = {i: t.detach().cpu() for i, t in pieces.items()}
    if dist.is_initialized():
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, local)
        local = {i: t for part in everyone for i, t in part.items()}
    return torch.cat([local[i] for i in sorted(local)])


def my_share(n):
    """The global indices 0..n-1 this rank works on: i with i mod world == rank (sample.py's layout). Work split
    this way ends with `gather_indexed`, so that no rank waits in a collective while another works alone."""
    if not dist.is_initialized():
        return list(range(n))
    return list(range(dist.get_rank(), n, dist.get_world_size()))


# ==== Command-line checks: a user's mistake is one line on stderr and exit status 2 ================================

class UsageError(Exception):
    """A mistake in a command line or in a file it names (not a bug in the code). `cli` prints it as one line."""


def cli(main):
    """Run a script's main(): a UsageError ends as `script.py: error: ...` on stderr with exit status 2, as argparse's
    own errors do (a traceback is for bugs)."""
    try:
        main()
    except UsageError as e:
        sys.stderr.write(f"{os.path.basename(sys.argv[0])}: error: {e}\n")
        sys.exit(2)


def number(kind=int, low=None, high=None, low_open=False, high_open=False):
    """An argparse type: a finite `kind` (int or float) in [low, high], low (high) itself excluded when `low_open`
    (`high_open`). number(int, 1) is a count, number(float, 0, low_open=True) a learning rate."""
    bounds = " and ".join(b for b in (low is not None and f"{'>' if low_open else '>='} {low}",
                                      high is not None and f"{'<' if high_open else '<='} {high}") if b)
    noun = "an integer" if kind is int else "a number"

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun}") from None
        if not math.isfinite(value) or (low is not None and (value <= low if low_open else value < low)) \
                or (high is not None and (value >= high if high_open else value > high)):
            raise argparse.ArgumentTypeError(f"{text} is out of range: give {noun} {bounds}")
        return value

    parse.__name__ = noun  # argparse names the type in its messages
    return parse


# The ranges most flags take.
COUNT, COUNT0 = number(int, 1), number(int, 0)                         # >= 1 (sizes, steps), >= 0 (0: off)
POSITIVE, NONNEG = number(float, 0, low_open=True), number(float, 0)   # > 0 (rates), >= 0 (weights, scales)
FRACTION = number(float, 0, 1)                                          # [0, 1] (probabilities, EMA rates)
BETA = number(float, 0, 1, high_open=True)                              # [0, 1) (Adam's betas)


def device_arg(text):
    """An argparse type for --device: a device torch knows AND this machine has (cuda needs a visible GPU)."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: give cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text}: no CUDA device is visible here (torch.cuda.is_available() is "
                                             "False); give --device cpu, or run where a GPU is")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise argparse.ArgumentTypeError(f"{text!r}: the scripts run on cpu or cuda")
    return text


device_arg.__name__ = "device"


def add_run_flags(group, checkpoints=True):
    """The flags of a long multi-GPU run: the collective timeout and, for a training stage, the save cadence."""
    group.add_argument("--dist-timeout", type=number(float, 0, low_open=True), default=DIST_TIMEOUT_MINUTES,
                       help="minutes a collective may wait for the slowest rank before the run stops (NCCL: 10)")
    if checkpoints:
        group.add_argument("--save-minutes", type=number(float, 0), default=30.0,
                           help="save checkpoint-last.pth every this many minutes (0: off); a SIGTERM saves and exits")


def input_path(flag, path, what, folder=False):
    """UsageError unless `path` exists and is a file (or a folder with folder=True): `what` says what to give."""
    kind = "folder" if folder else "file"
    if not os.path.exists(path):
        raise UsageError(f"{flag} {path}: no such {kind}; give {what} (weights and data are never downloaded)")
    if os.path.isdir(path) != folder:
        raise UsageError(f"{flag} {path} is a {'file' if folder else 'folder'}; give {what} (a {kind})")
    return path


@contextlib.contextmanager
def reading(flag, path):
    """Errors raised while reading the file a flag names (missing, truncated, not a checkpoint, the wrong model)
    become a UsageError that names the flag and the file."""
    try:
        yield
    except UsageError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UsageError(f"{flag} {path}: {first}") from None


def claim_out_dir(out_dir, resume=False, overwrite=False, inputs=(), writes=("checkpoint-last.pth",), outputs=()):
    """Check, before any work, that a run may write into `out_dir`: a folder it can create, never a file it reads
    (`inputs`: (flag, path) pairs), and never over a checkpoint it did not make unless told to continue it
    (--resume) or to replace it (--overwrite). With --overwrite, what the previous run left that a reader would take
    for this run's (`writes` and `outputs`: file names) is removed; temporary files of a killed save always are."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UsageError(f"--out-dir {out_dir} is a file; give a folder for the checkpoints and log.jsonl")
    writable_folder("--out-dir", out_dir)
    targets = [os.path.join(out_dir, name) for name in writes]
    for flag, path in inputs:
        if path and any(os.path.exists(t) and os.path.exists(path) and os.path.samefile(path, t) for t in targets):
            raise UsageError(f"{flag} {path} is a checkpoint this run would write in --out-dir {out_dir}; "
                             "give another --out-dir (a run never writes into its own input)")
    held = [t for t in targets if os.path.exists(t)]
    if held and not (resume or overwrite):
        raise UsageError(f"--out-dir {out_dir} already holds {os.path.basename(held[0])}: pass --resume to continue "
                         "that run, --overwrite to start over and replace it, or give another --out-dir")
    if not os.path.isdir(out_dir):
        return
    stale = [f for f in os.listdir(out_dir) if ".pth.tmp" in f]  # a save killed between write and rename
    if overwrite and not resume:
        stale += [name for name in (*writes, *outputs) if os.path.exists(os.path.join(out_dir, name))]
    for name in stale:
        with contextlib.suppress(FileNotFoundError):  # every rank runs this check
            os.remove(os.path.join(out_dir, name))
    if stale:
        print0(f"removed from {out_dir}: {', '.join(stale)}")


def writable_folder(flag, path):
    """UsageError unless `path` is a folder this process can write, or one it can create (its nearest existing
    ancestor is a writable folder). Creates nothing: a refused run leaves no trace."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise UsageError(f"{flag} {path}: {probe} is a file, so the folder cannot be made; give another {flag}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: {probe} is not writable by this user; give a folder you can write")


def check_outputs(writes, reads):
    """UsageError if a file the run writes is a file it reads (`writes`, `reads`: (flag, path) pairs; None skipped):
    no output ever replaces an input. Also checks that each output's folder can be written."""
    for wflag, wpath in writes:
        if not wpath:
            continue
        writable_folder(wflag, os.path.dirname(os.path.abspath(wpath)))
        for rflag, rpath in reads:
            if rpath and os.path.exists(wpath) and os.path.exists(rpath) and os.path.samefile(wpath, rpath):
                raise UsageError(f"{wflag} {wpath} is the {rflag} input: the run would replace what it reads; "
                                 f"give another {wflag}")


# ==== What made a checkpoint: --resume continues only the same run ===============================================

def fingerprint(state_dict):
    """A short digest of a model's weights (per tensor: name, shape, float64 sum and sum of squares): the same for the
    same weights wherever the file lies, different after any training step."""
    h = hashlib.sha1()
    for k, v in state_dict.items():
        if torch.is_tensor(v) and v.is_floating_point():
            v = v.detach().double()
            h.update(f"{k}{tuple(v.shape)}{v.sum().item():.12e}{v.square().sum().item():.12e}".encode())
    return h.hexdigest()[:12]


def run_record(stage, args, keys, inputs=None):
    """What a checkpoint records of the run that made it: the stage, the settings that define the run (`keys` of
    args: the model, the global batch, the data, the toy's configuration) and the inputs' fingerprints
    ({flag: (path, fingerprint)}), checked by `check_record` on --resume."""
    return {"stage": stage, "args": {k: getattr(args, k) for k in keys},
            "inputs": {flag: [os.path.abspath(p) if p else p, fp] for flag, (p, fp) in (inputs or {}).items()}}


def check_record(ck, record, path):
    """UsageError unless the checkpoint `ck` at `path` was made by the same stage, settings and inputs as `record`
    (`run_record`): resuming another stage's run, or with another teacher, student, model or batch, would graft the
    new inputs onto the old state and overwrite it."""
    stage = ck.get("record", {}).get("stage") or ("rl_refine.py" if "history" in ck else "distill_gsim.py"
                                                   if "aux" in ck else "train_mar.py")
    if stage != record["stage"]:
        raise UsageError(f"--resume: {path} was written by {stage}, not {record['stage']}: give the --out-dir of a "
                         f"{record['stage']} run, or another --out-dir to start one")
    old = ck.get("record")
    if old is None:
        return
    for k, v in record["args"].items():
        if k in old["args"] and old["args"][k] != v:
            flag = "--" + k.replace("_", "-")
            raise UsageError(f"--resume: {path} was made with {flag} {old['args'][k]}, this run has {flag} {v}: give "
                             "the same, or --overwrite to start over")
    for flag, (p, fp) in record["inputs"].items():
        if flag in old["inputs"] and old["inputs"][flag][1] != fp:
            raise UsageError(f"--resume: {path} was made from {flag} {old['inputs'][flag][0]} (weights "
                             f"{old['inputs'][flag][1]}), this run reads {flag} {p} (weights {fp}): give the same "
                             "input, or --overwrite to start over")


def assert_finite(module, hint):
    """UsageError if any weight of `module` is not finite (checked on every rank alike before a save: all ranks hold
    the same weights): a diverged run stops and keeps its last finite checkpoint. `hint`: the flag to lower."""
    if not all(bool(torch.isfinite(p).all()) for p in module.parameters()):
        raise UsageError(f"the weights are no longer finite: the run stopped without saving them (the last checkpoint "
                         f"is kept); {hint}")


# ==== Output on rank 0: print, the start of a run, the run log ===================================================

def is_main():
    """Rank 0 of the run: also after the process group is gone (torchrun's RANK), where the main process writes."""
    return dist.get_rank() == 0 if dist.is_initialized() else int(os.environ.get("RANK", 0)) == 0


def print0(*args, **kw):
    """print on rank 0 only (without replacing the builtin)."""
    if is_main():
        print(*args, **kw, flush=True)


def start_run(args, inputs=(), outputs=()):
    """The common start of every training stage: the output folder may take this run's checkpoints (`claim_out_dir`:
    `inputs` are the (flag, path) pairs the run reads, `outputs` the other files it writes there, which --overwrite
    removes with the checkpoints), then the process group and the per-rank batch (which must divide). Returns (rank,
    world, device, per-rank batch). The folder itself is made when the run log opens."""
    claim_out_dir(args.out_dir, args.resume, args.overwrite, inputs, ("checkpoint-last.pth", "checkpoint-best.pth"),
                  ("log.jsonl", "eval.json", *outputs))
    rank, world, device = setup_distributed(args.device, args.dist_timeout)
    if args.global_batch_size % world:
        raise UsageError(f"--global-batch-size {args.global_batch_size} does not divide among {world} processes; "
                         "give a multiple of the process count")
    print0(f"out dir: {os.path.abspath(args.out_dir)}; {world} process(es) on {device}, "
           f"batch {args.global_batch_size // world} each")
    return rank, world, device, args.global_batch_size // world


class RunLog:
    """The run's log: `add(stats)` every step, `flush(step, **extra)` at each log interval (one record averaged over
    the interval's steps AND over ranks, printed as one line by rank 0 and appended to OUT_DIR/log.jsonl).

    A step's numbers stay 0-d device tensors: `add` sums them on the device, and `flush` reads the sums once (one
    all-reduce, one host copy per interval). Reading them every step (`float(loss)`) would make the host wait for the
    GPU's queue to drain at every step. Every rank must call `flush` at the same steps (it holds a collective).
    """

    def __init__(self, out_dir, total, initial, desc, batch=None, diverged="lower the learning rate"):
        self.on, self.batch, self.sums, self.n, self.t0 = is_main(), batch, {}, 0, time.time()
        self.diverged = diverged  # what to do about a non-finite loss: the stage's flag to lower
        if self.on:
            os.makedirs(out_dir, exist_ok=True)
            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)
            path = os.path.join(out_dir, "log.jsonl")
            # The log holds what the checkpoint holds: records past the step a run resumes from (written before a
            # save that never completed, or by a run that crashed) are dropped, and a run from step 0 starts anew.
            kept = []
            if initial and os.path.exists(path):
                with open(path) as f:
                    kept = [line for line in f if _logged_step(line) <= initial]
            with open(path, "w") as f:
                f.writelines(kept)
            self.file = open(path, "a")

    def add(self, stats):
        """stats: {name: 0-d tensor or number}, summed where they live (no host copy)."""
        for k, v in stats.items():
            v = v.detach().float() if torch.is_tensor(v) else float(v)
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.n += 1
        if self.on:
            self.bar.update(1)

    def read(self):
        """The interval's means {name: float}, averaged over ranks: the one host copy of the interval."""
        if not self.n:
            return {}
        names = list(self.sums)
        device = next((v.device for v in self.sums.values() if torch.is_tensor(v)), torch.device("cpu"))
        flat = torch.stack([torch.as_tensor(self.sums[k], dtype=torch.float32, device=device) for k in names])  # (S,)
        if dist.is_initialized():
            dist.all_reduce(flat)
            flat /= dist.get_world_size()
        return dict(zip(names, (flat / self.n).tolist()))

    def flush(self, step, **extra):
        """Write the interval's record; returns it. A non-finite mean (a diverged loss) raises a UsageError on every
        rank alike, before the caller saves: the last checkpoint on disk is a finite one."""
        rec = self.read()
        seconds = (time.time() - self.t0) / max(1, self.n)
        rec.update(step=step, sec_per_step=seconds, **extra)
        if self.batch:
            rec["img_per_sec"] = self.batch / seconds
        self.write(rec)
        bad = [k for k, v in rec.items() if isinstance(v, float) and not math.isfinite(v)]
        if bad:  # the same on every rank (the means are all-reduced): every rank stops here, before the next save
            raise UsageError(f"non-finite {', '.join(bad)} in the steps up to {step}: the run stopped without saving "
                             f"(the last checkpoint is kept); {self.diverged}")
        self.sums, self.n, self.t0 = {}, 0, time.time()
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


def _logged_step(line):
    """The step of one log.jsonl line; a line cut short by a crash counts as past every step."""
    try:
        return json.loads(line).get("step", 0)
    except ValueError:
        return float("inf")


class StepControl:
    """What every rank decides together after each step: stop now (a SIGTERM came) and save now (a time cadence).

    SIGTERM is how SLURM and cloud schedulers announce a preemption (SLURM: `#SBATCH --signal=TERM@120` sends it 120 s
    before the end; torchrun passes it on to its workers). The handler only sets a flag; the loop finishes its
    current step, saves, and leaves, so the next run with --resume continues exactly. Saving by time rather than
    by steps bounds the work a crash loses (`save_minutes`) whatever a step costs. The main process keeps the clock.

    The ranks agree through one tiny all-reduce a step on a CPU (gloo) group: a rank that missed the signal, or a
    clock read a moment later, would otherwise make one rank save or stop while the others wait in the next step's
    collective. On a CPU tensor the all-reduce does not wait for the GPU.
    """

    def __init__(self, save_minutes=None):
        self.save_seconds = 60.0 * save_minutes if save_minutes else None  # 0 or None: no time cadence
        self.signalled, self.stopped, self.last_save = False, False, time.time()
        self.group = None
        if dist.is_initialized():
            self.group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
        self.previous = signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame):
        self.signalled = True

    def poll(self, step, last, save_every=0):
        """After step `step` of `last`: (save, stop), the same on every rank. Save at the last step, every
        `save_every` steps (0: never by count), when `save_minutes` have passed since the last save, and before
        stopping for a SIGTERM."""
        due = self.save_seconds is not None and is_main() and time.time() - self.last_save >= self.save_seconds
        flags = torch.tensor([float(self.signalled), float(due)])  # (2,) on the CPU
        if self.group is not None:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
        stop = bool(flags[0]) and step < last
        self.stopped = self.stopped or stop
        return stop or bool(flags[1]) or step >= last or bool(save_every and step % save_every == 0), stop

    def saved(self):
        self.last_save = time.time()

    def report(self, step):
        """The closing line of a stopped run (rank 0)."""
        print0(f"stopped by SIGTERM after step {step}: checkpoint-last.pth holds it; run again with --resume")

    def close(self):
        signal.signal(signal.SIGTERM, self.previous)


# ==== State: atomic checkpoints, EMA, per-step seeds ==============================================================

def save_checkpoint(path, obj):
    """Atomic save: write a temporary file in the same folder, then rename over `path` (a crash never leaves a
    half-written checkpoint, and a failed save never destroys the previous good one)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError from its zip writer
        full = getattr(e, "errno", None) == errno.ENOSPC or "No space left" in str(e) or "file write failed" in str(e)
        if full:
            raise UsageError(f"no space left on device writing {path}: the previous checkpoint is kept; free space "
                             "and run again with --resume") from None
        raise
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
    """ema = decay * ema + (1 - decay) * param for every parameter at once (one foreach kernel per dtype and device
    on a GPU rather than one launch per tensor; MAR keeps no buffers)."""
    torch._foreach_lerp_(list(ema_model.parameters()), [p.detach() for p in model.parameters()], 1.0 - decay)


# Seeds. torch's CPU generator (mt19937) keeps only the low 32 bits of its seed (manual_seed(1) and
# manual_seed(1 + 2**32) draw the same numbers), CUDA's Philox all 64: a seed is distinct only if its low 32 bits are.
SEED_BITS, STREAMS = 32, 4
MAX_SEED = 2 ** SEED_BITS - 1
SEED = number(int, 0, MAX_SEED)  # --seed's argparse type


def _fmix32(h):
    """MurmurHash3's 32-bit finaliser (Appleby 2008): a bijection of [0, 2^32) that scrambles every bit."""
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


def max_steps_for_seeds(world):
    """The longest run whose step seeds `step_seed` keeps distinct on `world` ranks: 2^32 / (STREAMS x world) steps,
    134 million on 8 ranks."""
    return 2 ** SEED_BITS // (STREAMS * world)


def step_seed(seed, rank, step, world=1, stream=0):
    """One seed per (run seed, rank, step, stream), distinct over every (rank, step, stream) of a run.

    The scripts re-seed their generators every step from it, so a run resumed at step n draws exactly what the
    uninterrupted run drew, with no RNG state to save. Streams keep a step's independent draws apart (0: the step's
    generator, 1: a second one (dropout's global seed in teacher training, the labels in RL), 2: host-side draws such
    as the mask ratio). The slot
    x = (step * world + rank) * STREAMS + stream is unique while step < max_steps_for_seeds(world); the low 32 bits
    are a bijection of x keyed by the run's seed (distinct within a run, unrelated across runs), the high 31 bits a
    hash of the seed (for CUDA's 64-bit Philox). A stride by the world size, not a fixed prime: with
    seed * 1,000,003 + rank * 7,919 + step, rank r at step s + 7,919 would redraw rank r + 1's batch of step s.
    """
    x = (step * world + rank) * STREAMS + stream  # rank and step may be numpy uint64 arrays (a test enumerates)
    if not (0 <= np.min(rank) and np.max(rank) < world and 0 <= stream < STREAMS and 0 <= np.min(x)
            and np.max(x) < 2 ** SEED_BITS and 0 <= seed <= MAX_SEED):
        raise ValueError(f"step_seed: step {step}, rank {rank} of {world}, stream {stream}, seed {seed} out of range "
                         f"(steps < {max_steps_for_seeds(world)}, seed in [0, {MAX_SEED}])")
    key = _fmix32(seed ^ 0x9E3779B9)
    low = _fmix32((_fmix32(x) + key) & 0xFFFFFFFF)  # a bijection of x for a fixed seed
    return (_fmix32(key + 1) & 0x7FFFFFFF) << 32 | low


def check_run_length(steps, world):
    """UsageError when a run of `steps` steps on `world` ranks is longer than its step seeds stay distinct."""
    if steps >= max_steps_for_seeds(world):
        raise UsageError(f"a run of {steps} steps on {world} processes is longer than its random seeds stay distinct "
                         f"({max_steps_for_seeds(world)} steps): lower --max-steps or --epochs")


def image_seed(base, index, stride=1_000_003):
    """The seed of image `index` drawn under `base` (a run's seed, or a training step's): base * stride + index modulo
    2^64 (torch's seed range), distinct for every index < stride under one base, in the low 32 bits too (stride odd).
    sample.py seeds each image from (--seed, its global index) so that its pixels do not depend on its batch or on the
    number of GPUs."""
    return (base * stride + index) % 2 ** 64


def machine(device="cpu"):
    """What a timing was measured on: {"cpu": model name, "threads": torch's, "matmul_gflops": fp32 throughput on
    `device`, and "gpu": its name on CUDA}.

    Toy timings scale with the last figure, not with the core count (docs/results.md lists the machines measured
    on). The best of three timings of four products of 1024^2 on `device`, about half a second on 2 CPU cores."""
    cpu = "unknown"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    a = torch.randn(1024, 1024, device=device)
    best = float("inf")
    for _ in range(3):
        if a.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(4):
            a @ a
        if a.is_cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    flops = 4 * 2 * 1024 ** 3  # four products, each n^3 multiply-adds = 2 n^3 floating-point operations
    out = {"cpu": cpu, "threads": torch.get_num_threads(), "matmul_gflops": round(flops / best / 1e9, 1)}
    if a.is_cuda:
        out["gpu"] = torch.cuda.get_device_name(a.device)
    return out
