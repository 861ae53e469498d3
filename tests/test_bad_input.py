"""Bad input: every script refuses a user's mistake before any work, as one line on stderr with exit status 2 (no
traceback), naming the flag; and no run writes over a checkpoint it did not make.

Kinds (each has tests): lost work, accepted nonsense, the form of the message, the diagnosis, late failure.
"""
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import common
import distill_gsim
import evaluate
import mar
import rl_refine
import sample
import train_mar

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = ["--preset", "toy", "--eval-images", "0", "--max-steps", "1"]


def refused(main, argv, capsys):
    """Run main(argv) as its script's __main__ does; return stderr after asserting a clean refusal."""
    with pytest.raises(SystemExit) as e:
        common.cli(lambda: main(argv))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err, err
    return err


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture
def run_dir(tmp_path, toy_ckpt):
    """A finished run's folder: a good teacher checkpoint we must not lose."""
    d = tmp_path / "run"
    d.mkdir()
    ckpt = d / "checkpoint-last.pth"
    ckpt.write_bytes(open(toy_ckpt, "rb").read())
    return str(d), str(ckpt), digest(ckpt)


# ---- 1. lost work -----------------------------------------------------------------------------------------------

def test_a_stage_never_writes_into_its_own_input(run_dir, capsys):
    d, ckpt, before = run_dir
    err = refused(distill_gsim.main, TOY + ["--teacher", ckpt, "--out-dir", d], capsys)
    assert "--teacher" in err and "its own input" in err
    err = refused(distill_gsim.main, TOY + ["--teacher", ckpt, "--out-dir", d, "--resume"], capsys)
    assert "its own input" in err
    assert digest(ckpt) == before


def test_a_run_refuses_to_start_over_a_checkpoint_it_did_not_make(run_dir, toy_vae_file, capsys):
    d, ckpt, before = run_dir
    err = refused(train_mar.main, TOY + ["--out-dir", d, "--toy-vae", toy_vae_file], capsys)
    assert "--out-dir" in err and "--resume" in err and "--overwrite" in err
    assert digest(ckpt) == before
    train_mar.main(TOY + ["--out-dir", d, "--toy-vae", toy_vae_file, "--overwrite"])  # said so: replaced
    assert digest(ckpt) != before and mar.checkpoint_kind(mar.read_checkpoint(ckpt)) == "teacher"


def test_rl_into_the_students_folder_is_refused(toy_student_ckpt, tmp_path, capsys):
    d = tmp_path / "s"
    d.mkdir()
    ckpt = d / "checkpoint-last.pth"
    ckpt.write_bytes(open(toy_student_ckpt, "rb").read())
    err = refused(rl_refine.main, ["--preset", "toy", "--student", str(ckpt), "--out-dir", str(d)], capsys)
    assert "--student" in err and "its own input" in err


# ---- 2. accepted nonsense ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("main, argv, flag", [
    (rl_refine.main, ["--preset", "toy", "--student", "s.pth", "--out-dir", "o", "--max-steps", "0"], "--max-steps"),
    (sample.main, ["--preset", "toy", "--ckpt", "c.pth", "--out-dir", "o", "--num-iter", "0"], "--num-iter"),
    (sample.main, ["--preset", "toy", "--ckpt", "c.pth", "--out-dir", "o", "--num-diffusion-steps", "0"],
     "--num-diffusion-steps"),
    (sample.main, ["--preset", "toy", "--ckpt", "c.pth", "--out-dir", "o", "--batch-size", "-1"], "--batch-size"),
    (train_mar.main, ["--preset", "toy", "--out-dir", "o", "--global-batch-size", "-4"], "--global-batch-size"),
    (train_mar.main, ["--preset", "toy", "--out-dir", "o", "--log-every", "0"], "--log-every"),
    (distill_gsim.main, ["--preset", "toy", "--teacher", "t.pth", "--out-dir", "o", "--lr-g=-1e-4"], "--lr-g"),
    (distill_gsim.main, ["--preset", "toy", "--teacher", "t.pth", "--out-dir", "o", "--eval-images", "-3"],
     "--eval-images"),
    (evaluate.main, ["--samples", "s.npz", "--toy", "--batch-size", "0"], "--batch-size"),
    (evaluate.main, ["--samples", "s.npz", "--clip-model", "ViT-B-32"], "--clip-weights"),
])
def test_numbers_out_of_range_are_refused_by_flag(main, argv, flag, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = refused(main, argv, capsys)
    assert flag in err and not os.path.exists("o")


def test_rl_refuses_a_per_process_batch_whose_images_would_share_seeds(toy_student_ckpt, tmp_path, capsys):
    out = str(tmp_path / "o")
    batch = str(rl_refine.STEP_STRIDE)  # one process: every image of a step needs its own seed below the stride
    err = refused(rl_refine.main, ["--preset", "toy", "--student", toy_student_ckpt, "--out-dir", out,
                                   "--global-batch-size", batch], capsys)
    assert "--global-batch-size" in err and "at most 130" in err
    assert not os.path.exists(out)


def test_a_student_is_not_a_teacher_and_the_other_way_round(toy_ckpt, toy_student_ckpt, tmp_path, capsys):
    out = str(tmp_path / "o")
    err = refused(distill_gsim.main, TOY + ["--teacher", toy_student_ckpt, "--out-dir", out], capsys)
    assert "--teacher" in err and "student" in err
    err = refused(rl_refine.main, ["--preset", "toy", "--student", toy_ckpt, "--out-dir", out], capsys)
    assert "--student" in err and "teacher" in err
    err = refused(sample.main, ["--preset", "toy", "--ckpt", toy_ckpt, "--one-step", "--out-dir", out], capsys)
    assert "--ckpt" in err and "drop --one-step" in err
    err = refused(sample.main, ["--preset", "toy", "--ckpt", toy_student_ckpt, "--out-dir", out], capsys)
    assert "add --one-step" in err
    assert not os.path.exists(out)


def test_toy_evaluation_refuses_imagenet_sized_images(tmp_path, capsys):
    np.savez(tmp_path / "rgb.npz", arr_0=np.zeros((20, 64, 64, 3), np.uint8), labels=np.zeros(20, np.int64))
    err = refused(evaluate.main, ["--samples", str(tmp_path / "rgb.npz"), "--toy"], capsys)
    assert "--toy" in err and "64 x 64" in err


def test_more_classes_than_the_model_has(toy_student_ckpt, tmp_path, capsys):
    err = refused(sample.main, ["--preset", "toy", "--ckpt", toy_student_ckpt, "--one-step", "--class-num", "20",
                                "--num-images", "20", "--out-dir", str(tmp_path / "o")], capsys)
    assert "--class-num 20" in err and not os.path.exists(tmp_path / "o")


# ---- 3. the form: one line, exit 2, through the real __main__ ----------------------------------------------------

def test_a_missing_file_is_one_line_from_the_command_line(tmp_path):
    r = subprocess.run([sys.executable, "sample.py", "--preset", "toy", "--ckpt", str(tmp_path / "nope.pth"),
                        "--one-step", "--out-dir", str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("sample.py: error: --ckpt")


# ---- 4. the diagnosis ---------------------------------------------------------------------------------------------

def test_a_folder_and_random_bytes_are_named_for_what_they_are(tmp_path, capsys):
    (tmp_path / "dir.pth").mkdir()
    err = refused(sample.main, ["--preset", "toy", "--ckpt", str(tmp_path / "dir.pth"), "--one-step",
                                "--out-dir", str(tmp_path / "o")], capsys)
    assert "is a folder" in err
    (tmp_path / "rand.pth").write_bytes(os.urandom(4096))
    err = refused(sample.main, ["--preset", "toy", "--ckpt", str(tmp_path / "rand.pth"), "--one-step",
                                "--out-dir", str(tmp_path / "o")], capsys)
    assert "not a torch checkpoint" in err and "Python objects" not in err


def test_a_checkpoint_of_another_model_says_check_model(toy_student_ckpt, tmp_path, capsys):
    torch.save({"model": {}}, tmp_path / "kl16.ckpt")
    err = refused(sample.main, ["--ckpt", toy_student_ckpt, "--one-step", "--vae", str(tmp_path / "kl16.ckpt"),
                                "--model", "mar_tiny", "--out-dir", str(tmp_path / "o")], capsys)
    assert "--ckpt" in err and "does not fit the model" in err and "Check --model" in err


def test_a_mar_checkpoint_given_as_the_vae_says_what_a_vae_is(toy_ckpt, tmp_path, capsys, monkeypatch):
    import data
    (tmp_path / "img" / "a").mkdir(parents=True)
    monkeypatch.setattr(sys, "argv", ["data.py", "cache", "--data-path", str(tmp_path / "img"), "--vae", toy_ckpt,
                                      "--out-dir", str(tmp_path / "cache")])
    err = refused(lambda argv: data.main(), None, capsys)
    assert "--vae" in err and "not a KL autoencoder" in err and not (tmp_path / "cache").exists()


def test_an_empty_pickscore_folder_is_named(toy_student_ckpt, tmp_path, capsys):
    (tmp_path / "ps").mkdir()
    torch.save({"model": {}}, tmp_path / "kl16.ckpt")
    err = refused(rl_refine.main, ["--student", toy_student_ckpt, "--vae", str(tmp_path / "kl16.ckpt"),
                                   "--pickscore-model", str(tmp_path / "ps"), "--out-dir", str(tmp_path / "o")], capsys)
    assert "--pickscore-model" in err and "config.json" in err and not os.path.exists(tmp_path / "o")


def test_an_unreadable_image_is_named_or_skipped(tmp_path, capsys):
    import data
    for c in ("a", "b"):
        (tmp_path / "img" / c).mkdir(parents=True)
        for i in range(2):
            from PIL import Image
            Image.new("RGB", (40, 40), (i * 50, 0, 0)).save(tmp_path / "img" / c / f"{i}.jpg")
    good = (tmp_path / "img" / "a" / "0.jpg").read_bytes()
    (tmp_path / "img" / "a" / "1.jpg").write_bytes(good[: len(good) // 3])  # truncated
    ds = data.ImageFolder(str(tmp_path / "img"), 32, flip=False)
    with pytest.raises(ValueError, match="1 unreadable image.*a/1.jpg"):
        data.check_images(ds)
    with pytest.raises(ValueError, match="a/1.jpg"):
        ds.load(1)
    skip = data.ImageFolder(str(tmp_path / "img"), 32, flip=False, skip_bad=True)
    x, label = skip.load(1)  # the next readable image stands in, and the skip is reported by path
    assert x.shape == (3, 32, 32) and label == 1 and "skipped" in capsys.readouterr().out


# ---- 5. late failure: every input is read before the first expensive step ----------------------------------------

def test_bad_reference_statistics_are_found_before_any_feature(tmp_path, monkeypatch, capsys):
    np.savez(tmp_path / "s.npz", arr_0=np.zeros((20, 32, 32, 3), np.uint8))
    np.savez(tmp_path / "ref.npz", mu=np.zeros(7), sigma=np.eye(7))
    torch.save(evaluate.FIDInception().state_dict(), tmp_path / "w.pth")
    calls = []
    monkeypatch.setattr(evaluate, "inception_features", lambda *a, **k: calls.append(1))
    err = refused(evaluate.main, ["--samples", str(tmp_path / "s.npz"), "--ref-stats", str(tmp_path / "ref.npz"),
                                  "--inception-weights", str(tmp_path / "w.pth")], capsys)
    assert "--ref-stats" in err and "(2048,)" in err and not calls


def test_nothing_is_written_when_an_input_is_missing(tmp_path, capsys):
    out = tmp_path / "o"
    refused(distill_gsim.main, ["--teacher", str(tmp_path / "t.pth"), "--cached-path", str(tmp_path),
                                "--out-dir", str(out)], capsys)
    refused(train_mar.main, ["--data-path", str(tmp_path / "missing"), "--vae", "v", "--out-dir", str(out)], capsys)
    assert not out.exists()


# ---- 6. outputs never replace inputs; a resumed run is the same run; --overwrite leaves no stale files ------------

def test_evaluate_never_writes_its_json_over_the_samples(tmp_path, capsys):
    samples = tmp_path / "s.npz"
    np.savez(samples, arr_0=np.full((20, 16, 16, 1), 100, np.uint8), labels=np.arange(20) % 10)
    before = digest(samples)
    err = refused(evaluate.main, ["--samples", str(samples), "--toy", "--json", str(samples)], capsys)
    assert "--json" in err and "--samples" in err and digest(samples) == before


def test_resume_with_another_teacher_or_from_another_stage_is_refused(toy_ckpt, tmp_path, capsys):
    out = str(tmp_path / "gsim")
    args = TOY + ["--global-batch-size", "8", "--out-dir", out]
    distill_gsim.main(args + ["--teacher", toy_ckpt])
    ckpt = os.path.join(out, "checkpoint-last.pth")
    before = digest(ckpt)
    other = tmp_path / "other.pth"  # another teacher: the same file with one weight changed
    ck = mar.read_checkpoint(toy_ckpt)
    ck["model_ema"] = {k: v + 0.01 if k == "fake_latent" else v for k, v in ck["model_ema"].items()}
    torch.save(ck, other)
    err = refused(distill_gsim.main, args + ["--teacher", str(other), "--resume", "--max-steps", "2"], capsys)
    assert f"--teacher {os.path.abspath(toy_ckpt)}" in err and f"--teacher {other}" in err
    err = refused(distill_gsim.main, args + ["--teacher", toy_ckpt, "--resume", "--max-steps", "2",
                                             "--global-batch-size", "16"], capsys)
    assert "--global-batch-size 8" in err and "--global-batch-size 16" in err
    assert digest(ckpt) == before
    teacher_run = tmp_path / "teacher_run"  # a train_mar.py folder given to GSIM's --resume
    teacher_run.mkdir()
    (teacher_run / "checkpoint-last.pth").write_bytes(open(toy_ckpt, "rb").read())
    err = refused(distill_gsim.main, TOY + ["--teacher", toy_ckpt, "--out-dir", str(teacher_run), "--resume"], capsys)
    assert "written by train_mar.py, not distill_gsim.py" in err


def test_overwrite_removes_what_the_old_run_left(toy_student_ckpt, toy_classifier_file, tmp_path):
    out = tmp_path / "rl"
    out.mkdir()
    for name in ("checkpoint-last.pth", "checkpoint-best.pth", "checkpoint-last.pth.tmp123"):
        (out / name).write_bytes(open(toy_student_ckpt, "rb").read())
    (out / "log.jsonl").write_text('{"step": 900, "reward": -1.0}\n')
    rl_refine.main(["--preset", "toy", "--student", toy_student_ckpt, "--out-dir", str(out), "--max-steps", "1",
                    "--eval-every", "0", "--global-batch-size", "2", "--classifier", toy_classifier_file,
                    "--overwrite"])
    assert sorted(os.listdir(out)) == ["checkpoint-last.pth", "log.jsonl"]  # the old best and the temp file: gone
    assert [json.loads(line)["step"] for line in open(out / "log.jsonl")] == [1]


# ---- 7. folders and sample files as they come -------------------------------------------------------------------

def image_tree(root, ext=".JPEG", classes=("n1", "n2"), n=2):
    from PIL import Image
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (40, 40), (60 * i, 90, 30)).save(root / c / f"{i}{ext}")


def test_imagenet_root_for_its_train_folder_and_upper_case_extensions(tmp_path, capsys):
    import data
    image_tree(tmp_path / "imagenet" / "train")
    image_tree(tmp_path / "imagenet" / "val")
    with pytest.raises(ValueError, match="train.*give the folder whose sub-folders are the classes"):
        data.find_images(str(tmp_path / "imagenet"))
    image_tree(tmp_path / "upper", ext=".JPG")
    (tmp_path / "upper" / "n1" / "notes.txt").write_text("x")
    classes, items, skipped = data.find_images(str(tmp_path / "upper"))
    assert len(items) == 4 and classes == ["n1", "n2"]
    line = data.describe_images("upper", classes, items, skipped)
    assert "2 classes, 4 images (2 to 2 per class" in line and "1 files skipped" in line and "notes.txt" in line


def test_sixteen_bit_palette_and_cmyk_images_are_converted_right(tmp_path):
    import data
    from PIL import Image
    grey16 = Image.fromarray(np.full((8, 8), 32896, np.uint16))  # 50% grey in 16 bits (PIL's convert clips it)
    assert np.array(data.to_rgb(grey16))[0, 0].tolist() == [128, 128, 128]
    pal = Image.new("RGB", (8, 8), (200, 10, 10)).convert("P", palette=Image.Palette.ADAPTIVE)
    assert np.array(data.to_rgb(pal))[0, 0].tolist() == [200, 10, 10]
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red
    assert np.array(data.to_rgb(cmyk))[0, 0].tolist() == [255, 0, 0]


@pytest.mark.parametrize("arr, labels, words", [
    (np.random.default_rng(0).integers(0, 2, (20, 16, 16, 1)).astype(np.uint8), np.arange(20) % 10, "0 or 1"),
    (np.full((20, 16, 16, 1), 100, np.uint8), np.arange(19) % 10, "for 20 images"),
    (np.full((20, 16, 16, 1), 100, np.uint8), np.arange(20), "outside the 10 classes"),
    (np.full((20, 16, 16, 1), 100.0), np.arange(20) % 10, "values from 100 to 100"),
])
def test_sample_files_with_wrong_values_or_labels_are_refused(arr, labels, words, tmp_path, capsys):
    np.savez(tmp_path / "s.npz", arr_0=arr, labels=labels)
    err = refused(evaluate.main, ["--samples", str(tmp_path / "s.npz"), "--toy"], capsys)
    assert "--samples" in err and words in err


# ---- 8. checked before the first expensive step ----------------------------------------------------------------

@pytest.mark.parametrize("flags, words", [
    (["--device", "gpu"], "'gpu' is not a device"),
    (["--device", "cuda"], "no CUDA device"),
    (["--seed", "-1"], "--seed"),
    (["--seed", str(2 ** 32)], "--seed"),
    (["--betas", "0.9", "1.0"], "--betas"),
])
def test_device_seed_and_betas_are_checked_by_their_flags(flags, words, toy_ckpt, tmp_path, capsys):
    if flags[-1] == "cuda" and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    err = refused(distill_gsim.main, TOY + ["--teacher", toy_ckpt, "--out-dir", str(tmp_path / "o")] + flags, capsys)
    assert words in err and not (tmp_path / "o").exists()


def test_an_out_dir_that_cannot_be_made_is_refused_before_work(toy_ckpt, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    err = refused(distill_gsim.main, TOY + ["--teacher", toy_ckpt, "--out-dir", str(tmp_path / "file" / "run")],
                  capsys)
    assert "--out-dir" in err and "is a file" in err


def test_a_bare_state_dict_is_named_as_such(toy_ckpt, tmp_path, capsys):
    torch.save(mar.read_checkpoint(toy_ckpt)["model"], tmp_path / "sd.pth")
    err = refused(sample.main, ["--preset", "toy", "--ckpt", str(tmp_path / "sd.pth"), "--one-step",
                                "--out-dir", str(tmp_path / "o")], capsys)
    assert "bare state dict" in err


# ---- 9. faults of long runs ---------------------------------------------------------------------------------------

def test_a_diverged_run_stops_naming_the_flag_and_keeps_its_last_finite_checkpoint(toy_vae_file, tmp_path, capsys,
                                                                                   monkeypatch):
    real, calls = train_mar.train_step, [0]

    def step(*a, **kw):  # the third step's loss is NaN
        calls[0] += 1
        loss, norm = real(*a, **kw)
        return (loss * float("nan"), norm) if calls[0] == 3 else (loss, norm)
    monkeypatch.setattr(train_mar, "train_step", step)
    out = tmp_path / "t"
    err = refused(train_mar.main, ["--preset", "toy", "--toy-vae", toy_vae_file, "--eval-images", "0", "--max-steps",
                                   "5", "--global-batch-size", "8", "--log-every", "1", "--save-every", "1",
                                   "--out-dir", str(out)], capsys)
    assert "non-finite loss" in err and "--lr" in err
    assert mar.read_checkpoint(str(out / "checkpoint-last.pth"))["step"] == 2


def test_a_full_disk_is_named_and_the_log_matches_the_checkpoint(toy_vae_file, tmp_path, capsys, monkeypatch):
    import errno
    real, calls = torch.save, [0]

    def save(obj, path, *a, **kw):  # the second checkpoint does not fit on the disk
        calls[0] += 1
        if calls[0] == 2:
            open(path, "wb").write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, path, *a, **kw)
    out = tmp_path / "t"
    argv = ["--preset", "toy", "--toy-vae", toy_vae_file, "--eval-images", "0", "--max-steps", "4",
            "--global-batch-size", "8", "--log-every", "1", "--save-every", "2", "--out-dir", str(out)]
    with monkeypatch.context() as m:
        m.setattr(torch, "save", save)
        err = refused(train_mar.main, argv, capsys)
    assert "no space left on device" in err and "checkpoint-last.pth" in err
    assert sorted(os.listdir(out)) == ["checkpoint-last.pth", "log.jsonl"]  # no temporary file left behind
    assert mar.read_checkpoint(str(out / "checkpoint-last.pth"))["step"] == 2
    train_mar.main(argv + ["--resume"])
    assert [json.loads(line)["step"] for line in open(out / "log.jsonl")] == [1, 2, 3, 4]


def test_sampling_into_a_folder_of_earlier_samples_needs_overwrite(toy_student_ckpt, tmp_path, capsys):
    out = tmp_path / "s"
    argv = ["--preset", "toy", "--ckpt", toy_student_ckpt, "--one-step", "--num-iter", "2", "--out-dir", str(out)]
    sample.main(argv + ["--num-images", "20"])
    before = digest(out / "samples.npz")
    err = refused(sample.main, argv + ["--num-images", "10"], capsys)
    assert "already holds samples" in err and "--overwrite" in err and digest(out / "samples.npz") == before
    sample.main(argv + ["--num-images", "10", "--overwrite"])
    assert len(os.listdir(out / "images")) == 10  # none of the earlier run's 20 PNGs is left


def test_completing_a_latent_cache_with_another_vae_is_refused(tmp_path, capsys, monkeypatch):
    import argparse
    import data
    import vae
    image_tree(tmp_path / "imgs")
    small = lambda seed: vae.AutoencoderKL(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
                                           resolution=32).eval()
    args = argparse.Namespace(data_path=str(tmp_path / "imgs"), vae="v", out_dir=str(tmp_path / "cache"),
                              img_size=32, batch_size=2, device="cpu", num_workers=0, bad_images="stop")
    torch.manual_seed(0)
    monkeypatch.setattr(vae, "load_vae", lambda path, m=small(0): m)
    data.cache_latents(args)
    torch.manual_seed(1)
    monkeypatch.setattr(vae, "load_vae", lambda path, m=small(1): m)
    with pytest.raises(common.UsageError, match="made with VAE weights"):
        data.cache_latents(args)
    assert len(data.CachedLatents(args.out_dir)) == 4  # the manifest is not a stray file
