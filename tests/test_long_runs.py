"""What a multi-day run on many GPUs needs and no single short CPU run would show: every rank does its share of an
evaluation (and the result equals one process's), randomness distinct for every (rank, step) of the longest default
runs, no host synchronisation inside a step, and a SIGTERM that saves and lets --resume continue bit for bit."""
import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import common
import distill_gsim
import rl_refine
import train_mar
from test_distill import FAST as DISTILL_FAST
from test_train_mar import torchrun

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- Seeds --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("world, steps", [(8, rl_refine.run_length(rl_refine.get_args(
    ["--student", "-", "--vae", "-", "--out-dir", "-", "--pickscore-model", "-"]))),   # RL's default: 400,365 steps
                                          (64, 30 * (1_281_167 // 512))])                # GSIM's 30 epochs at 512
def test_step_seeds_are_distinct_over_every_rank_and_step(world, steps):
    """Every (rank, step, stream) of a default-length run gets its own seed, and distinct in the low 32 bits, all that
    torch's CPU generator keeps (fixed prime strides, seed * 1,000,003 + rank * 7,919 + step, would repeat seven of
    every eight RL batches on 8 ranks)."""
    step = np.arange(steps, dtype=np.uint64)[:, None]                          # (steps, 1)
    rank = np.arange(world, dtype=np.uint64)[None]                             # (1, world)
    low = np.concatenate([common.step_seed(1, rank, step, world, stream) & 0xFFFFFFFF for stream in range(3)])
    assert low.size == 3 * steps * world and np.unique(low).size == low.size
    assert common.step_seed(1, 3, 1234, world) == common.step_seed(1, np.uint64(3), np.uint64(1234), world)


def test_step_seeds_differ_between_runs_and_refuse_what_they_cannot_keep_apart():
    a = {common.step_seed(1, r, s, 2) for r in range(2) for s in range(1000)}
    b = {common.step_seed(2, r, s, 2) for r in range(2) for s in range(1000)}
    assert len(a) == len(b) == 2000 and not a & b
    with pytest.raises(ValueError, match="out of range"):
        common.step_seed(1, 0, common.max_steps_for_seeds(8), 8)
    with pytest.raises(common.UsageError, match="--max-steps"):
        common.check_run_length(common.max_steps_for_seeds(8), 8)
    base = common.step_seed(7, 1, 5, 8)  # RL's per-image seeds under one step: distinct in the low 32 bits too
    per_image = {common.image_seed(base, b, rl_refine.STEP_STRIDE) & 0xFFFFFFFF for b in range(rl_refine.STEP_STRIDE)}
    assert len(per_image) == rl_refine.STEP_STRIDE


# ---- No host synchronisation inside a step ------------------------------------------------------------------------

class HostReads(TorchDispatchMode):
    """Counts `_local_scalar_dense`, the operator behind .item(), float(t), bool(t) and `if t:`: on a GPU each one
    makes the host wait for every queued kernel. Reads of the optimizer's own step counters are left out: torch keeps
    those on the CPU on a GPU too."""

    def __init__(self, ignore=()):
        super().__init__()
        self.ignore, self.n = {t.data_ptr() for t in ignore}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and args[0].data_ptr() not in self.ignore:
            self.n += 1
        return func(*args, **(kwargs or {}))


def host_reads(fn, optimizers):
    counters = [s["step"] for opt in optimizers for s in opt.state.values() if torch.is_tensor(s.get("step"))]
    with HostReads(counters) as spy:
        fn()
    return spy.n


def test_no_host_synchronisation_inside_a_step(toy_ckpt, toy_student_ckpt, toy_classifier_file, tmp_path):
    """train_mar's, GSIM's and RL's steps, the EMA update and the log's per-step bookkeeping read nothing back from
    the device (each step runs twice: the first creates the optimizer states)."""
    import copy
    import data
    import evaluate
    import mar
    model = data.toy_model_of(toy_ckpt)
    mar.load_mar(toy_ckpt, model, verbose=False)
    tok = data.toy_tokenizer_of(toy_ckpt)
    latents, labels = torch.randn(4, 16, 4, 4), torch.arange(4)
    ema, log = copy.deepcopy(model), common.RunLog(str(tmp_path), 1, 0, "t")

    # teacher training: the mask ratio comes from the host's generator
    opt = train_mar.build_optimizer(model.train(), 1e-4, 0.02)
    step = lambda: log.add(dict(zip(("loss", "grad_norm"), train_mar.train_step(
        model, opt, latents, labels, torch.Generator().manual_seed(0), "fp32", 3.0, 0.8))))
    step()
    assert host_reads(lambda: (step(), common.update_ema(ema, model, 0.99)), [opt]) == 0

    # GSIM
    args = distill_gsim.get_args(DISTILL_FAST + ["--teacher", "-", "--out-dir", "-"])
    nets = distill_gsim.build_gsim(model.eval().requires_grad_(False), args)
    import random
    step = lambda: log.add(distill_gsim.gsim_step(nets, latents, labels, torch.Generator().manual_seed(0), args,
                                                  rng=random.Random(0)))
    step()
    assert host_reads(step, [nets.opt_g, nets.opt_a]) == 0

    # RL with the DRaFT+ penalty, the toy reward through the toy decoder
    args = rl_refine.get_args(["--preset", "toy", "--student", "-", "--out-dir", "-"])
    args.precision = "fp32"
    policy = data.toy_model_of(toy_student_ckpt)
    mar.load_mar(toy_student_ckpt, policy, verbose=False)
    reference = copy.deepcopy(policy).requires_grad_(False)
    reward = evaluate.ToyEvaluator(toy_classifier_file).log_prob
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-5)
    gens = lambda: [torch.Generator().manual_seed(b) for b in range(2)]
    step = lambda: log.add(rl_refine.rl_step(policy, reference, tok, reward, labels[:2], gens(), opt, args))
    step()
    assert host_reads(step, [opt]) == 0
    # the spy sees a read when there is one
    assert host_reads(lambda: float(torch.ones(())), []) == 1


# ---- Every rank does its share of an evaluation -------------------------------------------------------------------

HELD_OUT = textwrap.dedent("""
    # RL's held-out evaluation and the toy sampler, run by every process of the group (or by one process alone)
    import copy, json, sys, torch
    import common, data, evaluate, mar, rl_refine
    student, classifier, out = sys.argv[1:4]
    rank, world, _ = common.setup_distributed("cpu")
    args = rl_refine.get_args(["--preset", "toy", "--student", student, "--out-dir", "-", "--eval-images", "30"])
    args.precision = "fp32"
    model = data.toy_model_of(student)
    mar.load_mar(student, model, verbose=False)
    model.eval()  # as RL's EMA model is (dropout off)
    reference = copy.deepcopy(model)
    with torch.no_grad():  # a reference other than the policy: the drift is not zero
        for p in reference.diffloss.net.parameters():
            p.add_(0.01)
    tok, ev = data.toy_tokenizer_of(student), evaluate.ToyEvaluator(classifier)
    made, sample = [0], model.sample_tokens
    def counting(bsz, *a, **kw):  # the images this rank generates for the held-out set
        made[0] += bsz
        return sample(bsz, *a, **kw)
    model.sample_tokens = counting
    rec, imgs, labels = rl_refine.held_out(model, reference, tok, ev.log_prob, ev, args, 10)
    model.sample_tokens = sample
    toy, _, _ = evaluate.sample_toy(model, tok, 300, 2, one_step=True, seed=5)  # two batches of evaluate.TOY_BATCH
    if common.is_main():
        torch.save({"rec": rec, "imgs": imgs, "toy": toy}, out)
    json.dump({"rank": rank, "made": made[0]}, open(out + f".rank{rank}", "w"))
    common.cleanup_distributed()
""")


def test_two_processes_share_the_evaluation_and_agree_with_one(toy_student_ckpt, toy_classifier_file, tmp_path):
    script = tmp_path / "held_out.py"
    script.write_text(f"import sys; sys.path.insert(0, {ROOT!r})\n" + HELD_OUT)
    one, two = str(tmp_path / "one.pt"), str(tmp_path / "two.pt")
    # one process with the thread count torchrun gives each (the sum order of a matmul depends on it)
    env = {**{k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(script), toy_student_ckpt, toy_classifier_file, one], cwd=ROOT, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    r = torchrun(str(script), [toy_student_ckpt, toy_classifier_file, two])
    assert r.returncode == 0, "\n".join(line for line in r.stderr.splitlines() if line.startswith("[rank"))[-4000:]
    made = [json.load(open(f"{two}.rank{k}"))["made"] for k in range(2)]
    assert made == [25, 5] and json.load(open(f"{one}.rank0"))["made"] == 30  # chunks of rl_refine.EVAL_CHUNK
    a, b = torch.load(one), torch.load(two)
    assert a["rec"]["drift"] > 0 and a["rec"] == b["rec"]  # every number, to the bit
    assert torch.equal(b["imgs"], a["imgs"]) and torch.equal(b["toy"], a["toy"])


# ---- SIGTERM: save at the end of the step, resume exactly ---------------------------------------------------------

def sigterm_during_call(monkeypatch, module, name, call):
    """Make the `call`-th call of module.name send this process a SIGTERM while it runs (a preemption mid-step)."""
    real, count = getattr(module, name), [0]

    def wrapped(*a, **kw):
        count[0] += 1
        if count[0] == call:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **kw)
    monkeypatch.setattr(module, name, wrapped)


def stage_runs(toy_ckpt, toy_student_ckpt, toy_classifier_file):
    return [(train_mar, "train_step", ["--preset", "toy", "--toy-vae", "-", "--global-batch-size", "8",
                                       "--eval-images", "0", "--log-every", "1"]),
            (distill_gsim, "gsim_step", DISTILL_FAST + ["--teacher", toy_ckpt, "--save-every", "0"]),
            (rl_refine, "rl_step", ["--preset", "toy", "--student", toy_student_ckpt, "--global-batch-size", "4",
                                    "--classifier", toy_classifier_file, "--eval-every", "2", "--eval-images", "20",
                                    "--log-every", "1", "--save-every", "0", "--lr", "1e-4"])]


@pytest.mark.parametrize("stage", [0, 1, 2], ids=["train_mar", "distill_gsim", "rl_refine"])
def test_sigterm_saves_the_step_and_resume_is_bit_identical(stage, toy_ckpt, toy_student_ckpt, toy_classifier_file,
                                                             toy_vae_file, tmp_path, monkeypatch, capsys):
    module, step_fn, base = stage_runs(toy_ckpt, toy_student_ckpt, toy_classifier_file)[stage]
    base = [toy_vae_file if a == "-" else a for a in base]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    handler = signal.getsignal(signal.SIGTERM)
    module.main(base + ["--out-dir", a, "--max-steps", "5"])
    with monkeypatch.context() as m:
        sigterm_during_call(m, module, step_fn, 3)
        module.main(base + ["--out-dir", b, "--max-steps", "5"])  # returns after saving step 3
    assert "stopped by SIGTERM after step 3" in capsys.readouterr().out
    stopped = torch.load(os.path.join(b, "checkpoint-last.pth"), weights_only=False)
    assert stopped["step"] == 3 and not os.path.exists(os.path.join(b, "eval.json"))
    assert signal.getsignal(signal.SIGTERM) is handler  # the run's handler is gone with the run
    module.main(base + ["--out-dir", b, "--max-steps", "5", "--resume"])
    ca, cb = (torch.load(os.path.join(d, "checkpoint-last.pth"), weights_only=False) for d in (a, b))
    assert ca["step"] == cb["step"] == 5
    for part in [k for k in ("model", "model_ema", "aux") if k in ca]:
        assert all(torch.equal(ca[part][k], cb[part][k]) for k in ca[part]), part
    if "history" in ca:  # RL: the held-out evaluations and the selection are the same too
        assert ca["history"] == cb["history"] and ca["best"] == cb["best"]


STOP_ONE_RANK = textwrap.dedent("""
    # train_mar.py under torchrun, where only rank 1 receives a SIGTERM, during its second step
    import os, signal, sys
    import train_mar
    real = train_mar.train_step
    calls = [0]
    def step(*a, **kw):
        calls[0] += 1
        if calls[0] == 2 and os.environ["RANK"] == "1":
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **kw)
    train_mar.train_step = step
    train_mar.main(sys.argv[1:])
""")


def test_a_sigterm_to_one_rank_stops_every_rank_at_the_same_step(toy_vae_file, tmp_path):
    script = tmp_path / "stop_one.py"
    script.write_text(f"import sys; sys.path.insert(0, {ROOT!r})\n" + STOP_ONE_RANK)
    out = tmp_path / "run"
    r = torchrun(str(script), ["--preset", "toy", "--toy-vae", toy_vae_file, "--global-batch-size", "8",
                               "--eval-images", "0", "--log-every", "1", "--max-steps", "6", "--out-dir", str(out)])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "stopped by SIGTERM after step 2" in r.stdout
    assert torch.load(out / "checkpoint-last.pth", weights_only=False)["step"] == 2
