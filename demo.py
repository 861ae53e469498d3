"""The whole MARVAL pipeline on the bundled toy digits, on a CPU: 9 to 21 minutes on 2 cores (the time scales with
the machine's matmul throughput, which report.md records; docs/results.md, section 1, gives measured runs).

    python demo.py                       # -> runs/demo/report.md, report.json, grid_*.png

Stages (each is the real script, called in-process with --preset toy; a finished stage found in --out-dir is reused,
an interrupted one resumes):
  0. the toy VAE (vae.ToyVAE, ~40 s, cached in --out-dir): 16x16 digits <-> 4x4x16 latents, KL-16 in miniature
  1. teacher:  train_mar.py    MAR on the latents (16 tokens of 16 values), 100-step diffusion head
  2. student:  distill_gsim.py GSIM distillation of the head into ONE step (MARVAL stage 1)
  3. RL:       rl_refine.py    reward back-propagation through the K-step generation, reward = log p(digit | image)
                               under the toy classifier, with the DRaFT+ regulariser and FID-bounded selection
  4. evaluation of teacher / student / student+RL with the same labels, seeds and K, latents decoded by the toy
     VAE: toy FID and IS (a CNN trained on the training digits plays Inception; reference = the 397 held-out digits),
     class accuracy, reward, each the mean over three seed sets of 400 images; seconds per image and speed-up over
     the teacher (timed at K = --num-iter with 200 images per call; the teacher samples with 100 head steps and its
     CFG, the students one step at cfg 1; experiments.py times K = 1..16); grids.png: real, teacher, student and
     RL digits side by side.

The table is written as markdown and JSON: {"teacher": {...}, "student": {...}, "student_rl": {...},
"real_split_fid": FID of all training digits against the held-out ones, "real_floor_fid": the same for 400 of them
(the floor at the generated sets' size), "settings": {...}, "seconds": {...}}; each
model's toy_fid / accuracy / reward are means over the seed sets, toy_fid_by_seed / accuracy_by_seed the values.
"""
import argparse
import json
import os
import shlex
import time

import torch

import common
import data
import distill_gsim
import evaluate
import figures
import mar
import rl_refine
import train_mar


def stage_done(path, steps):
    """A stage is finished when its checkpoint exists and reached the planned step count."""
    return os.path.exists(path) and mar.read_checkpoint(path)["step"] >= steps


def run_stages(args):
    """Train / distill / refine unless already done in args.out_dir; returns the stage folders and their times.

    The teacher and the student get whole schedules (--epochs: the cosine learning rate reaches its end), not a run
    cut short; a toy epoch is 1,400 // 64 = 21 steps."""
    d = lambda name: os.path.join(args.out_dir, name)
    clf = os.path.join(args.out_dir, "toy_classifier.pt")
    per_epoch = len(data.toy_digits("train")[1]) // 64
    seconds = {}
    stages = [
        ("teacher", train_mar.main, args.teacher_epochs * per_epoch,
         ["--preset", "toy", "--epochs", str(args.teacher_epochs), "--eval-images", "0", "--classifier", clf,
          "--toy-vae", os.path.join(args.out_dir, "toy_vae.pt")]
         + args.teacher_args),
        ("student", distill_gsim.main, args.distill_epochs * per_epoch,
         ["--preset", "toy", "--teacher", os.path.join(d("teacher"), "checkpoint-last.pth"), "--eval-images", "0",
          "--epochs", str(args.distill_epochs), "--teacher-cfg", str(args.teacher_cfg), "--classifier", clf]
         + args.distill_args),
        ("student_rl", rl_refine.main, args.rl_steps,
         ["--preset", "toy", "--student", os.path.join(d("student"), "checkpoint-last.pth"), "--classifier", clf,
          "--max-steps", str(args.rl_steps), "--eval-images", str(args.rl_eval_images)] + args.rl_args),
    ]
    # Each stage script is called in-process through its own main(argv): the demo runs exactly the commands a user
    # would type, with --resume so that an interrupted stage continues instead of starting again.
    for name, fn, steps, argv in stages:
        sec = run_stage(fn, d(name), steps, argv)
        if sec is not None:
            seconds[name] = sec
    return d, clf, seconds


def run_stage(fn, out_dir, steps, argv):
    """Run one stage script (its main(argv)) into out_dir unless its checkpoint already reached `steps`; resumes an
    interrupted one. Returns the seconds it took, or None when reused."""
    ckpt = os.path.join(out_dir, "checkpoint-last.pth")
    if stage_done(ckpt, steps):
        print(f"[demo] reusing {ckpt}")
        return None
    print(f"[demo] {fn.__module__}: {steps} steps -> {out_dir}")
    t0 = time.time()
    fn(argv + ["--out-dir", out_dir, "--resume"])
    return time.time() - t0


def load_toy(path):
    """(EMA MAR of the checkpoint's size in eval mode, the toy VAE tokenizer it carries)."""
    return mar.load_mar(path, data.toy_model_of(path), verbose=False).eval(), data.toy_tokenizer_of(path)


def seconds_per_image(model, tokenizer, num_iter, n, **kw):
    """Sampling speed: a warm-up call of 20 images, then the best of two timed calls of n images (toy VAE decoding
    included, as KL-16's is on ImageNet)."""
    evaluate.sample_toy(model, tokenizer, 20, num_iter, **kw)
    return min(evaluate.sample_toy(model, tokenizer, n, num_iter, seed=60_000 + r, **kw)[2] for r in range(2))


EVAL_SEEDS = (50_000, 51_000, 52_000)  # three evaluation seed sets: toy FID of 400 digits moves by ~+-2 between them


TITLES = {"teacher": "teacher (MAR, 100 steps)", "student": "student (1 step)", "student_rl": "student + RL"}


def evaluate_all(args, d, clf):
    """Teacher (100 head steps, CFG) vs student and student+RL (one step, cfg 1) on identical labels and seeds."""
    ev = evaluate.ToyEvaluator(clf)
    rl_ckpt = os.path.join(d("student_rl"), "checkpoint-best.pth")
    paths = {"teacher": os.path.join(d("teacher"), "checkpoint-last.pth"),
             "student": os.path.join(d("student"), "checkpoint-last.pth"),
             "student_rl": rl_ckpt if os.path.exists(rl_ckpt) else os.path.join(d("student_rl"), "checkpoint-last.pth")}
    kwargs = {"teacher": dict(cfg=args.teacher_cfg), "student": dict(one_step=True), "student_rl": dict(one_step=True)}
    # each model with the toy VAE its checkpoint carries (all three are the teacher's, passed on by the stages)
    models = {name: (*load_toy(path), kwargs[name]) for name, path in paths.items()}
    # Quality: the same labels (0..9 cycling) and generator seeds for every model, so differences are the models';
    # three seed sets, the mean reported as toy_fid / accuracy / reward and each set's value beside it.
    report, grids = {}, {}
    for name, (model, tok, kw) in models.items():
        runs = []
        for seed in EVAL_SEEDS:
            imgs, labels, _ = evaluate.sample_toy(model, tok, args.eval_images, args.num_iter, seed=seed, **kw)
            with torch.no_grad():
                runs.append(dict(ev(imgs, labels), reward=ev.log_prob(imgs, labels).mean().item()))
            grids.setdefault(name, (imgs, labels))  # the first seed set's images are the ones shown
        report[name] = {key: sum(r[key] for r in runs) / len(runs) for key in ("toy_fid", "toy_is", "accuracy",
                                                                               "reward")}
        report[name]["toy_fid_by_seed"] = [r["toy_fid"] for r in runs]
        report[name]["accuracy_by_seed"] = [r["accuracy"] for r in runs]
    real_x, real_y = data.toy_digits("heldout")
    figures.save_titled_grids([("real (held-out)", real_x, real_y)]
                               + [(TITLES[n], *grids[n]) for n in models], os.path.join(args.out_dir, "grids.png"))
    for name, (imgs, labels) in grids.items():
        figures.save_class_grid(imgs, labels, os.path.join(args.out_dir, f"grid_{name}.png"))
    # Speed: 200 images per call (MAR at K = 64 predicts ~4 of 256 tokens per step; K = 4 on 16 tokens is the toy's
    # analogue), a warm-up call first, the best of two timed calls. The teacher pays 100 head steps per token and the
    # CFG doubling of its batch; the students pay one head call and no doubling. Only at the evaluation's K: how the
    # speed-up shrinks with K is experiments.py's K sweep (timing K = 8 and 16 here cost the demo 35 s).
    for name, (model, tok, kw) in models.items():
        report[name]["sec_per_image"] = seconds_per_image(model, tok, args.num_iter, args.timing_images, **kw)
    for name in models:
        report[name]["speedup"] = report["teacher"]["sec_per_image"] / report[name]["sec_per_image"]
    report["real_split_fid"] = ev.real_split_fid()
    report["real_floor_fid"] = ev.real_floor(args.eval_images)  # the floor at the generated sets' size
    report["settings"] = {"num_iter": args.num_iter, "eval_images": args.eval_images, "teacher_cfg": args.teacher_cfg,
                          "teacher_diffusion_steps": 100, **common.machine()}
    return report


def write_report(report, seconds, out_dir):
    """report.json (machine-readable) and report.md (the table the README quotes)."""
    report["seconds"] = seconds
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    rows = ["| model | toy FID (mean; per seed set) | toy IS | accuracy | reward (log p) | s / image | speed-up |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for name in ("teacher", "student", "student_rl"):
        r = report[name]
        by_seed = " / ".join(f"{v:.2f}" for v in r["toy_fid_by_seed"])
        rows.append(f"| {name} | {r['toy_fid']:.2f} ({by_seed}) | {r['toy_is']:.2f} | {100 * r['accuracy']:.1f}% | "
                    f"{r['reward']:.3f} | {r['sec_per_image']:.4f} | {r['speedup']:.1f}x |")
    s = report["settings"]
    md = "\n".join(["# MARVAL toy demo", "",
                    f"K = {s['num_iter']} AR iterations, {s['eval_images']} images per model (labels 0-9 cycling, "
                    f"identical seeds, {len(EVAL_SEEDS)} seed sets); teacher: {s['teacher_diffusion_steps']} head "
                    f"steps, cfg {s['teacher_cfg']}; students: 1 head step, cfg 1; {s['threads']} threads of "
                    f"{s['cpu']} ({s['matmul_gflops']:.0f} GFLOP/s in fp32 matmuls: the times scale with it).", "",
                    *rows, "",
                    f"The floor: {s['eval_images']} real training digits score {report['real_floor_fid']:.2f} "
                    f"(mean of 10 class-balanced draws; all 1,400 score {report['real_split_fid']:.2f}); teacher "
                    f"{report['teacher']['toy_fid'] / report['real_floor_fid']:.2f}x, student "
                    f"{report['student']['toy_fid'] / report['real_floor_fid']:.2f}x the floor. "
                    f"Student / teacher toy FID: {report['student']['toy_fid'] / report['teacher']['toy_fid']:.2f}x.",
                    "", "![real, teacher, student and RL digits](grids.png)", "",
                    "Stage times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()), ""])
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(md)
    print(md)


def build_parser(description=__doc__, out_dir="runs/demo"):
    """The demo's flags (experiments.py adds its own to the same parser)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default=out_dir)
    p.add_argument("--teacher-epochs", type=common.COUNT, default=150,
                   help="toy epochs of 21 steps (train_mar's own: 380)")
    p.add_argument("--distill-epochs", type=common.COUNT, default=20,
                   help="20 fits the demo's ten minutes (student 0.90x "
                   "its teacher); distill_gsim.py's and experiments.py's toy default 30 (0.80x) costs ~50 s more")
    p.add_argument("--rl-steps", type=common.COUNT, default=150)
    p.add_argument("--teacher-cfg", type=common.NONNEG, default=1.2,
                   help="the guided teacher GSIM distills (MAR convention)")
    p.add_argument("--num-iter", type=common.COUNT, default=4, help="AR iterations K for evaluation")
    p.add_argument("--eval-images", type=common.COUNT, default=400, help="digits per seed set (a multiple of 10)")
    p.add_argument("--rl-eval-images", type=common.COUNT, default=400)
    p.add_argument("--timing-images", type=common.COUNT, default=200, help="images per timed sampling call")
    p.add_argument("--teacher-args", default="", help="extra flags for train_mar.py, one string: "
                                                            "--teacher-args='--lr 1e-3'")
    p.add_argument("--distill-args", default="", help="extra flags for distill_gsim.py, one string")
    p.add_argument("--rl-args", default="", help="extra flags for rl_refine.py, one string")
    return p


def parse(p, argv):
    """Parse, splitting the extra-flag strings into argument lists."""
    args = p.parse_args(argv)
    if args.eval_images <= 0 or args.eval_images % 10:
        p.error(f"--eval-images {args.eval_images}: give a positive multiple of 10 (the labels cycle over the ten "
                "digits, and the floor is measured on as many class-balanced real digits)")
    args.teacher_args, args.distill_args, args.rl_args = map(shlex.split, (args.teacher_args, args.distill_args,
                                                                         args.rl_args))
    return args


def main(argv=None):
    args = parse(build_parser(), argv)
    if os.path.isfile(args.out_dir):
        raise common.UsageError(f"--out-dir {args.out_dir} is a file; give a folder for the demo's runs")
    common.writable_folder("--out-dir", args.out_dir)
    os.makedirs(args.out_dir, exist_ok=True)
    t0 = time.time()
    d, clf, seconds = run_stages(args)
    report = evaluate_all(args, d, clf)
    seconds["total"] = time.time() - t0
    write_report(report, seconds, args.out_dir)
    return report


if __name__ == "__main__":
    common.cli(main)
