"""train_mar.py: exact resume, 2-process gloo agreement, clean failures."""
import hashlib
import os
import subprocess
import sys

import pytest
import torch

import data
import mar
import train_mar
from conftest import ROOT

FAST = ["--preset", "toy", "--global-batch-size", "16", "--eval-images", "0", "--log-every", "1", "--save-every", "2"]


@pytest.fixture
def fast(toy_vae_file):
    """FAST with the session's small toy VAE (the default --toy-vae would train the real one into runs/)."""
    return FAST + ["--toy-vae", toy_vae_file]


def assert_same_checkpoint(a, b):
    assert a["step"] == b["step"]
    for part in ("model", "model_ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    oa, ob = a["optimizer"]["state"], b["optimizer"]["state"]
    assert oa.keys() == ob.keys()
    for i in oa:
        for k in oa[i]:
            assert torch.equal(torch.as_tensor(oa[i][k]), torch.as_tensor(ob[i][k])), (i, k)


def test_kill_and_resume_equals_uninterrupted(tmp_path, fast):
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    train_mar.main(fast + ["--out-dir", straight, "--max-steps", "5"])
    train_mar.main(fast + ["--out-dir", split, "--max-steps", "3"])          # "killed" after step 3
    train_mar.main(fast + ["--out-dir", split, "--max-steps", "5", "--resume"])
    a = mar.read_checkpoint(os.path.join(straight, "checkpoint-last.pth"))
    b = mar.read_checkpoint(os.path.join(split, "checkpoint-last.pth"))
    assert a["step"] == 5
    assert_same_checkpoint(a, b)
    # the weights moved: a resume that silently restarted from scratch or skipped steps would differ above
    fresh = mar.MAR(**data.TOY_MODEL).state_dict()
    assert any(not torch.equal(fresh[k], a["model"][k]) for k in fresh)


def test_checkpoint_is_official_format(tmp_path, fast):
    out = str(tmp_path / "run")
    train_mar.main(fast + ["--out-dir", out, "--max-steps", "2"])
    path = os.path.join(out, "checkpoint-last.pth")
    ck = mar.read_checkpoint(path)
    assert {"model", "model_ema", "optimizer", "step", "args"} <= set(ck)
    model = mar.load_mar(path, mar.MAR(**data.TOY_MODEL))  # loads like any MAR
    assert torch.equal(model.fake_latent, ck["model_ema"]["fake_latent"])
    assert open(os.path.join(out, "log.jsonl")).read().count("\n") == 2


def test_resume_with_a_mismatched_model_fails_and_keeps_the_checkpoint(tmp_path, fast):
    out = str(tmp_path / "run")
    train_mar.main(fast + ["--out-dir", out, "--max-steps", "2"])
    path = os.path.join(out, "checkpoint-last.pth")
    digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
    with pytest.raises(train_mar.common.UsageError, match="--resume.*diffloss"):
        train_mar.main(fast + ["--out-dir", out, "--max-steps", "4", "--resume", "--diffloss-w", "64"])
    assert hashlib.sha256(open(path, "rb").read()).hexdigest() == digest


def test_bad_arguments(tmp_path, toy_vae_file):
    with pytest.raises(SystemExit):
        train_mar.get_args(["--out-dir", "x"])  # no data source
    with pytest.raises(SystemExit):
        train_mar.get_args(["--out-dir", "x", "--data-path", "imgs"])  # images need the VAE
    with pytest.raises(train_mar.common.UsageError, match="--global-batch-size 5000 is more than the"):
        train_mar.main(["--preset", "toy", "--out-dir", str(tmp_path), "--global-batch-size", "5000", "--toy-vae",
                        toy_vae_file])


def test_toy_out_dirs_default_and_real_runs_must_name_one(capsys):
    import distill_gsim
    import rl_refine
    assert train_mar.get_args(["--preset", "toy"]).out_dir == "runs/toy_teacher"
    assert distill_gsim.get_args(["--preset", "toy", "--teacher", "t.pth"]).out_dir == "runs/toy_student"
    assert rl_refine.get_args(["--preset", "toy", "--student", "s.pth"]).out_dir == "runs/toy_rl"
    assert train_mar.get_args(["--preset", "toy", "--out-dir", "mine"]).out_dir == "mine"
    for parse, argv in ((train_mar.get_args, ["--cached-path", "c"]),
                        (distill_gsim.get_args, ["--teacher", "t.pth", "--cached-path", "c"]),
                        (rl_refine.get_args, ["--student", "s.pth", "--vae", "kl16.ckpt"])):
        with pytest.raises(SystemExit):
            parse(argv)
        assert "--out-dir is required" in capsys.readouterr().err


def torchrun(script, args, nproc=2, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script] + args
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_two_process_gloo_run_keeps_ranks_identical(tmp_path, fast):
    out = str(tmp_path / "ddp")
    r = torchrun("train_mar.py", fast + ["--out-dir", out, "--max-steps", "3"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "ranks agree: all 2 processes" in r.stdout + r.stderr
    assert mar.read_checkpoint(os.path.join(out, "checkpoint-last.pth"))["step"] == 3


GLOO_EXIT_CHECK = """
import glob, os, sys
sys.path.insert(0, {root!r})
import torch
import common
rank = common.setup_distributed()[0]
torch.optim.AdamW(torch.nn.Linear(2, 2).parameters())  # imports torch._dynamo (and torch.distributed._shard)
common.cleanup_distributed()
left = [n for n in (open(f).read().strip() for f in glob.glob("/proc/self/task/*/comm")) if "gloo" in n]
os.write(1, f"rank {{rank}}: gloo threads after cleanup: {{left}}\\n".encode())  # one write: ranks do not interleave
sys.exit(1 if left else 0)
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc to list threads")
def test_cleanup_frees_the_gloo_group_before_interpreter_exit(tmp_path):
    """destroy_process_group must really free the gloo group: threads left for interpreter teardown aborted a rank
    at exit now and then ('terminate called without an active exception'). Importing torch.distributed._shard
    after init_process_group (torch.optim does, through torch._dynamo) kept it alive; setup_distributed imports it
    first. Without that import this test fails every time (checked)."""
    script = tmp_path / "gloo_exit.py"
    script.write_text(GLOO_EXIT_CHECK.format(root=str(ROOT)))
    r = torchrun(str(script), [])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert r.stdout.count("gloo threads after cleanup: []") == 2, r.stdout
