"""The MARVAL paper's experiments in miniature: its tables, and the questions it leaves open, on the toy, on a CPU.

    python experiments.py                         # -> runs/experiments/report.md, report.json, fig_*.png
    python experiments.py --out-dir runs/exp --cfgs 1.0,2.0 --num-iters 1,4,16 --sizes small,base

About half an hour from nothing on 2 cores (docs/results.md, section 2). Like demo.py (whose
flags it shares) it runs the real stage scripts in-process and reuses whatever is finished in --out-dir: the stage
checkpoints, and each section's numbers (sections/*.json, recomputed when the section's settings change). It first
runs the demo's pipeline (toy VAE, teacher, student, RL; the student with the full 30-epoch schedule, the demo's 20
being its time budget), then:

  headline        teacher (MAR, 100 head steps, cfg --teacher-cfg) vs the default one-step student at K = 4:
                  toy FID per seed set, IS, accuracy, seconds per image.      Paper: main table (MAR-B 2.60 vs
                  MARVAL-B 3.06, MAR-H 2.06 vs MARVAL-H 2.00; ~33x / >30x faster).
  cfg_sweep       a student distilled at each teacher cfg (--sweep-distill-epochs, shorter than the default
                  student's), sampled at cfg 1: FID, IS, precision, recall, accuracy; the teacher at the same cfg
                  beside it. Figure: FID against IS labelled by cfg.   Paper: CFG ablation, MARVAL-B w = 1 / 1.2 /
                  2 / 4 -> FID 3.75 / 3.06 / 7.98 / 13.84, IS rising with w (the paper's w read as MAR's cfg).
  num_iter_sweep  teacher and student at K AR iterations: FID and seconds per image. Figure: FID against
                  log10 seconds per image.                              Paper: N_AR 64 (RL) and 128 (evaluation).
  model_size      toy widths/depths (data.TOY_SIZES), each a teacher trained and distilled with the same schedule:
                  FID and speed.                                        Paper: MARVAL-B / L / H.
  diversity       precision and recall (k = 3, evaluate.precision_recall, the code ImageNet's numbers use) of
                  teacher and student, and per class the recall of that class's held-out digits (mode coverage).
                  Figure: per-class recall.                             Paper: open question 3 (diversity).
  rl              the student before and after RL under the reward's classifier (log p, the PickScore analogue),
                  an independent pixel-MLP classifier the policy never sees (accuracy), and a second reward, that
                  MLP's class similarity (the CLIP-score analogue), all on evaluation seeds the RL selection never
                  saw. Figure: RL's reward against FID over training, independent accuracy beside it.
                                                                        Paper: CLIP 29.40 -> 29.47, ImageReward
                                                                        -0.142 -> -0.110 (MARVAL-B).

Every evaluation samples 400 digits per seed set (labels 0-9 cycling, the demo's seeds): headline, model size,
diversity and RL over the 3 seed sets (mean and each value), the sweeps over the first set only. Toy FID of 400
digits moves by about +-1 between seed sets: differences smaller than that are noise, and the report says which
shapes hold beyond it. Seconds per image: the sweeps time their own 400-image sampling call (after a warm-up);
headline and model size take the best of two 200-image calls (demo.seconds_per_image).
"""
import json
import os
import shutil
import time

import numpy as np
import torch

import common
import data
import demo
import distill_gsim
import evaluate
import figures
import train_mar

FID_NOISE = 1.0  # least toy FID spread between seed sets of 400 digits: smaller differences are not shapes

# ----------------------------------------------------------------------------------------------------------------
# Measuring: one seed set of samples -> numbers; a section's numbers cached under its settings
# ----------------------------------------------------------------------------------------------------------------


# Every model is sampled with the same labels (0-9 cycling) and generator seeds, so two numbers in one table differ by
# the models alone; the seed sets are demo.EVAL_SEEDS, so the headline here and demo.py's table are the same numbers.
def score(ev, imgs, labels, diversity=False):
    """Toy FID / IS / accuracy of one seed set; with `diversity` precision and recall (k = 3) against the held-out
    digits and, per class, the recall of that class's held-out digits by that class's samples (mode coverage)."""
    m = ev(imgs, labels)
    out = {"fid": m["toy_fid"], "is": m["toy_is"], "accuracy": m["accuracy"]}
    if diversity:
        # the same k-NN balls as ImageNet's precision / recall, in the toy classifier's feature space (its
        # "Inception"); per class, a class's samples against that class's ~40 held-out digits: a generator that
        # drops a mode of one digit (a slant, a stroke style) loses recall there even if the pooled recall is fine
        fake = ev.features(imgs)                                                      # (N, 128)
        out["precision"], out["recall"] = evaluate.precision_recall(ev.ref_feats, fake, k=3)
        ref_y, y = data.toy_digits("heldout")[1].numpy(), labels.cpu().numpy()
        out["class_recall"] = [evaluate.precision_recall(ev.ref_feats[ref_y == c], fake[y == c], k=3)[1]
                               for c in range(10)]
    return out


def measure(ev, model, tok, num_iter, seeds, n, diversity=False, **kw):
    """score() for each evaluation seed set; also returns the first set's images (for the grids) and the seconds
    per image of the sampling calls (the first call after a small warm-up)."""
    evaluate.sample_toy(model, tok, 20, num_iter, **kw)  # warm-up: the first call pays allocation and thread start-up
    runs, first, secs = [], None, []
    for seed in seeds:
        imgs, labels, sec = evaluate.sample_toy(model, tok, n, num_iter, seed=seed, **kw)
        runs.append(score(ev, imgs, labels, diversity))
        first, secs = first or (imgs, labels), secs + [sec]
    return runs, first, min(secs)


def mean(runs, key):
    return float(np.mean([r[key] for r in runs]))


def cached(out_dir, name, settings, compute):
    """A section's result from sections/<name>.json when it was computed with the same settings, else compute()
    and save it (atomically: an interrupted run never leaves half a file)."""
    # the settings include everything the numbers depend on (schedules, CFG, K, seeds, extra flags): change one and
    # the section is measured again, change nothing and a rerun only redraws the report
    path = os.path.join(out_dir, "sections", f"{name}.json")
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        if saved["settings"] == settings:
            print(f"[experiments] {name}: reusing {path}")
            return saved["result"]
    print(f"[experiments] {name} ...")
    t0 = time.time()
    result = compute()
    result["seconds"] = time.time() - t0
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump({"settings": settings, "result": result}, f, indent=1)
    os.replace(path + ".tmp", path)
    return result


# ----------------------------------------------------------------------------------------------------------------
# The sections
# ----------------------------------------------------------------------------------------------------------------


def headline_and_diversity(args, ev, teacher, student, seeds):
    """Teacher vs default student at K = --num-iter over the seed sets: FID, IS, accuracy, speed, and diversity."""
    t_runs, t_first, _ = measure(ev, *teacher, args.num_iter, seeds, args.eval_images, True, cfg=args.teacher_cfg)
    s_runs, s_first, _ = measure(ev, *student, args.num_iter, seeds, args.eval_images, True, one_step=True)
    t_sec = demo.seconds_per_image(*teacher, args.num_iter, args.timing_images, cfg=args.teacher_cfg)
    s_sec = demo.seconds_per_image(*student, args.num_iter, args.timing_images, one_step=True)
    headline = {"teacher_fid": [r["fid"] for r in t_runs], "student_fid": [r["fid"] for r in s_runs],
                "teacher_is": mean(t_runs, "is"), "student_is": mean(s_runs, "is"),
                "teacher_accuracy": mean(t_runs, "accuracy"), "student_accuracy": mean(s_runs, "accuracy"),
                "teacher_sec_per_image": t_sec, "student_sec_per_image": s_sec, "speedup": t_sec / s_sec,
                "real_split_fid": ev.real_split_fid()}
    diversity = {"teacher_precision": mean(t_runs, "precision"), "teacher_recall": mean(t_runs, "recall"),
                 "student_precision": mean(s_runs, "precision"), "student_recall": mean(s_runs, "recall"),
                 "teacher_class_recall": np.mean([r["class_recall"] for r in t_runs], 0).tolist(),
                 "student_class_recall": np.mean([r["class_recall"] for r in s_runs], 0).tolist()}
    # the real digits against themselves: the precision / recall a perfect generator would get (train vs held-out);
    # below 1 because 400 digits do not cover every held-out digit's k-NN ball
    real_x = data.toy_digits("train")[0]
    pick = torch.randperm(len(real_x), generator=torch.Generator().manual_seed(0))[: args.eval_images]
    diversity["real_precision"], diversity["real_recall"] = evaluate.precision_recall(
        ev.ref_feats, ev.features(real_x[pick]), k=3)
    figures.save_titled_grids([("real (held-out)", *data.toy_digits("heldout")), ("teacher", *t_first),
                                ("student (1 step)", *s_first)], os.path.join(args.out_dir, "grids.png"))
    return {"headline": headline, "diversity": diversity}


def num_iter_sweep(args, ev, teacher, student, seeds):
    """Teacher and student at each K. The teacher's cost per image is K transformer passes plus 100 head calls per
    token (fixed, whatever K); the student's is K passes plus one head call per token. So the speed-up is largest at
    K = 1 and shrinks towards (transformer + head) / transformer as K grows."""
    rows = []
    for K in args.num_iters:
        t_runs, _, t_sec = measure(ev, *teacher, K, seeds, args.eval_images, cfg=args.teacher_cfg)
        s_runs, _, s_sec = measure(ev, *student, K, seeds, args.eval_images, one_step=True)
        rows.append({"num_iter": K, "teacher_fid": mean(t_runs, "fid"), "student_fid": mean(s_runs, "fid"),
                     "teacher_sec_per_image": t_sec, "student_sec_per_image": s_sec, "speedup": t_sec / s_sec})
    return {"rows": rows}


def cfg_sweep(args, ev, teacher, seeds, clf, teacher_ckpt):
    """One student per teacher cfg, distilled with --sweep-distill-epochs; the teacher at that cfg beside it.

    The paper's ablation value w is the CFG of the distillation target, read here as MAR's cfg (docs/derivation.md
    on the two readings of MARVAL Eq. 10); the student itself samples without guidance, so its trade-off is baked
    in at distillation time. The teacher's own curve at the same cfg shows what the student inherits."""
    rows = []
    for cfg in args.cfgs:
        out = os.path.join(args.out_dir, "cfg_sweep", f"student_cfg{cfg:g}")
        demo.run_stage(distill_gsim.main, out, args.sweep_distill_epochs * steps_per_epoch(),
                       ["--preset", "toy", "--teacher", teacher_ckpt, "--teacher-cfg", str(cfg), "--epochs",
                        str(args.sweep_distill_epochs), "--eval-images", "0", "--classifier", clf]
                       + args.distill_args)
        student = demo.load_toy(os.path.join(out, "checkpoint-last.pth"))
        s_runs, _, _ = measure(ev, *student, args.num_iter, seeds, args.eval_images, True, one_step=True)
        t_runs, _, _ = measure(ev, *teacher, args.num_iter, seeds, args.eval_images, cfg=cfg)
        rows.append({"cfg": cfg, **{k: mean(s_runs, k) for k in ("fid", "is", "precision", "recall", "accuracy")},
                     "teacher_fid": mean(t_runs, "fid"), "teacher_is": mean(t_runs, "is")})
    return {"rows": rows}


def model_size(args, ev, main_dirs, seeds, clf, vae_path):
    """Each --sizes entry: a teacher (same epochs as the main one) and its student (same distillation), or for
    "base" the main teacher and student themselves."""
    rows = []
    for size in args.sizes:
        if size == "base":
            t_ckpt, s_ckpt = main_dirs
        else:
            root = os.path.join(args.out_dir, "model_size", size)
            t_ckpt, s_ckpt = (os.path.join(root, n, "checkpoint-last.pth") for n in ("teacher", "student"))
            demo.run_stage(train_mar.main, os.path.dirname(t_ckpt), args.teacher_epochs * steps_per_epoch(),
                           ["--preset", "toy", "--toy-size", size, "--epochs", str(args.teacher_epochs),
                            "--eval-images", "0", "--classifier", clf, "--toy-vae", vae_path] + args.teacher_args)
            demo.run_stage(distill_gsim.main, os.path.dirname(s_ckpt), args.distill_epochs * steps_per_epoch(),
                           ["--preset", "toy", "--teacher", t_ckpt, "--epochs", str(args.distill_epochs),
                            "--teacher-cfg", str(args.teacher_cfg), "--eval-images", "0", "--classifier", clf]
                           + args.distill_args)
        teacher, student = demo.load_toy(t_ckpt), demo.load_toy(s_ckpt)
        t_runs, _, _ = measure(ev, *teacher, args.num_iter, seeds, args.eval_images, cfg=args.teacher_cfg)
        s_runs, _, _ = measure(ev, *student, args.num_iter, seeds, args.eval_images, one_step=True)
        t_sec = demo.seconds_per_image(*teacher, args.num_iter, args.timing_images, cfg=args.teacher_cfg)
        s_sec = demo.seconds_per_image(*student, args.num_iter, args.timing_images, one_step=True)
        rows.append({"size": size, **data.TOY_SIZES[size], "params": sum(p.numel() for p in teacher[0].parameters()),
                     "teacher_fid": mean(t_runs, "fid"), "student_fid": mean(s_runs, "fid"),
                     "teacher_fid_by_seed": [r["fid"] for r in t_runs],
                     "student_fid_by_seed": [r["fid"] for r in s_runs],
                     "teacher_sec_per_image": t_sec, "student_sec_per_image": s_sec, "speedup": t_sec / s_sec})
    return {"rows": rows}


# RL's own held-out set (rl_refine.py) is also the set its checkpoint selection maximises, so numbers on it are
# optimistic; here before / after are measured on the evaluation seeds, which the selection never saw.
def rl_before_after(args, ev, watcher, student, rl, seeds):
    """Default student (before) and its RL checkpoint (after) on the evaluation seeds: the reward (log p under the
    reward's classifier), accuracy and FID, and the independent MLP's accuracy and class similarity."""
    out = {}
    for when, (model, tok) in (("before", student), ("after", rl)):
        runs = []
        for seed in seeds:
            imgs, labels, _ = evaluate.sample_toy(model, tok, args.eval_images, args.num_iter, one_step=True,
                                                  seed=seed)
            with torch.no_grad():
                runs.append({**score(ev, imgs, labels), "reward": ev.log_prob(imgs, labels).mean().item(),
                             "independent_accuracy": watcher(imgs, labels)["accuracy"],
                             "second_reward": watcher.similarity(imgs, labels).mean().item()})
        for key, name in (("reward", "reward"), ("accuracy", "accuracy"), ("fid", "fid"),
                          ("independent_accuracy", "independent_accuracy"), ("second_reward", "second_reward")):
            out[f"{name}_{when}"] = mean(runs, key)
        out[f"fid_{when}_by_seed"] = [r["fid"] for r in runs]
    return out


def stage_times(out_dir, new):
    """Seconds of each demo stage as measured when it ran (sections/stages.json keeps them across invocations)."""
    path = os.path.join(out_dir, "sections", "stages.json")
    old = json.load(open(path)) if os.path.exists(path) else {}
    merged = {**old, **new}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(merged, f)
    os.replace(path + ".tmp", path)
    return merged


def steps_per_epoch():
    return len(data.toy_digits("train")[1]) // 64  # the toy's global batch (train_mar / distill_gsim toy defaults)


# ----------------------------------------------------------------------------------------------------------------
# Figures and the report
# ----------------------------------------------------------------------------------------------------------------


def draw_figures(rep, out_dir):
    """fig_cfg.png (the paper's FID-IS trade-off curve), fig_num_iter.png (quality and speed-up against K: where the
    one-step student sits), fig_diversity.png (per-class recall on a 0-1 axis); fig_rl.png is rl_refine.py's own.
    Draws from a report.json's numbers alone (`python experiments.py --redraw report.json`), so a figure is redrawn
    without rerunning its section; a section or a series missing from `rep` is left out."""
    floor = rep.get("headline", {}).get("real_floor_fid")
    fid_axis = "toy FID of 400 digits (lower is better)"
    floor_line = {"hline": (floor, f"floor: 400 real digits, {floor:.2f}")} if floor else {}
    if rep.get("cfg_sweep"):
        cfg = rep["cfg_sweep"]
        series = [("student: 1 step, distilled at cfg, sampled at cfg 1",
                   [(r["is"], r["fid"], f"cfg {r['cfg']:g}: {r['fid']:.1f}") for r in cfg])]
        if "teacher_is" in cfg[0]:
            series.insert(0, ("teacher: 100 steps at cfg", [(r["teacher_is"], r["teacher_fid"], f"{r['cfg']:g}")
                                                            for r in cfg]))
        figures.plot_panels([dict(title="CFG trade-off: FID against IS (labels: cfg)", xlabel="toy IS (higher: "
                                 "more confident classes)", ylabel=fid_axis, series=series, **floor_line)],
                           os.path.join(out_dir, "fig_cfg.png"), size=(6.4, 4.6))
    if rep.get("num_iter_sweep"):
        ks = rep["num_iter_sweep"]
        kticks = [r["num_iter"] for r in ks]
        fid = dict(title="quality against AR iterations K", xlabel="AR iterations K", ylabel=fid_axis, xscale="log",
                   xticks=kticks, label_offsets=((-5, -12), (5, 5)),  # the curves cross: teacher below-left
                   series=[(f"{m} ({'100 head steps' if m == 'teacher' else '1 head step'})",
                            [(r["num_iter"], r[f"{m}_fid"], f"{r[f'{m}_fid']:.1f}") for r in ks])
                           for m in ("teacher", "student")], **floor_line)
        speed = dict(title="speed-up of the one-step student over the teacher", xlabel="AR iterations K",
                     xscale="log", xticks=kticks,
                     ylabel="teacher / student seconds per image", ylim=(0, 1.1 * max(r["speedup"] for r in ks)),
                     series=[("speed-up", [(r["num_iter"], r["speedup"], f"{r['speedup']:.1f}x") for r in ks])])
        if "student_sec_per_image" in ks[0]:
            speed["note"] = "seconds per image, student: " + ", ".join(
                f"K={r['num_iter']} {1e3 * r['student_sec_per_image']:.1f} ms" for r in ks)
        figures.plot_panels([fid, speed], os.path.join(out_dir, "fig_num_iter.png"))
    if rep.get("diversity", {}).get("teacher_class_recall"):
        div = rep["diversity"]
        figures.plot_panels([dict(title="mode coverage: recall of each class's held-out digits", xlabel="digit class",
                                 ylabel="recall, k = 3 (fraction)", ylim=(0, 1),
                                 xticks=list(range(len(div["teacher_class_recall"]))),
                                 series=[(f"{m} (all classes together: {div[f'{m}_recall']:.3f})",
                                          [(c, v, None) for c, v in enumerate(div[f"{m}_class_recall"])])
                                         for m in ("teacher", "student")])],
                           os.path.join(out_dir, "fig_diversity.png"))


def shapes(rep):
    """The expected shapes of the paper's tables, each checked against the toy's noise; True / False per shape."""
    cfg, ks, rl, div = rep["cfg_sweep"], rep["num_iter_sweep"], rep["rl"], rep["diversity"]
    # the noise of one FID: half the range over the headline's seed sets (at least FID_NOISE)
    h = rep["headline"]
    noise = max([FID_NOISE] + [(max(v) - min(v)) / 2 for v in (h["teacher_fid"], h["student_fid"])])
    out = {"fid_noise": noise}
    # each check below is the expected shape, with FID differences inside the noise not counted
    t, s = np.mean(h["teacher_fid"]), np.mean(h["student_fid"])
    out["student_near_teacher"] = bool(s <= max(1.18 * t, t + noise))  # MARVAL-B's ratio, or within the noise
    if len(cfg) > 1:
        best = min(r["fid"] for r in cfg)
        out["cfg_is_rises_with_cfg"] = cfg[-1]["is"] > cfg[0]["is"] and \
            all(b["is"] >= a["is"] - 0.05 * a["is"] for a, b in zip(cfg, cfg[1:]))
        # the minimum at a small cfg: some cfg <= 1.5 within the noise of the best FID, and the largest cfg worse
        out["cfg_fid_min_at_small_cfg"] = any(r["cfg"] <= 1.5 and r["fid"] <= best + noise for r in cfg) and \
            cfg[-1]["fid"] > best + noise
    if len(ks) > 1:
        out["speedup_shrinks_with_k"] = all(b["speedup"] < a["speedup"] for a, b in zip(ks, ks[1:]))
    out["student_recall_at_least_0.9x_teacher"] = div["student_recall"] >= 0.9 * div["teacher_recall"]
    out["rl_raises_reward"] = rl["reward_after"] > rl["reward_before"]
    out["rl_keeps_independent_accuracy"] = rl["independent_accuracy_after"] >= rl["independent_accuracy_before"] - 0.01
    sizes = sorted(rep["model_size"], key=lambda r: r["params"])
    if len(sizes) > 1:
        for m in ("teacher", "student"):
            out[f"larger_model_lower_{m}_fid"] = sizes[-1][f"{m}_fid"] < sizes[0][f"{m}_fid"] - noise
    return out


def yes(flag):
    return "**yes**" if flag else "**no**"


def write_report(rep, out_dir):
    h, div, rl, sh = rep["headline"], rep["diversity"], rep["rl"], rep["shapes"]
    s = rep["settings"]
    fids = lambda v: f"{np.mean(v):.2f} ({' / '.join(f'{x:.2f}' for x in v)})"
    md = ["# MARVAL in miniature: the paper's experiments on the toy", "",
          f"K = {s['num_iter']} AR iterations unless stated, {s['eval_images']} digits per seed set, teacher: 100 "
          f"head steps at cfg {s['teacher_cfg']}, students: 1 step at cfg 1; {s['threads']} threads of {s['cpu']} "
          f"({s['matmul_gflops']:.0f} GFLOP/s in fp32 matmuls). The floor: "
          f"{s['eval_images']} real training digits score {h['real_floor_fid']:.2f} (10 class-balanced draws; all "
          f"1,400: {h['real_split_fid']:.2f}). One FID's noise, half its range over the headline's seed sets: "
          f"+-{sh['fid_noise']:.2f}; the shape checks below ignore differences smaller than that.", "",
          "## Headline: teacher vs one-step student", "",
          "Paper (main table): MAR-B 2.60 vs MARVAL-B 3.06 (1.18x), MAR-H 2.06 vs MARVAL-H 2.00 (0.97x); MARVAL-B "
          "~33x faster than MAR-B.", "",
          "| model | toy FID (mean; per seed set) | toy IS | accuracy | s / image |", "| --- | --- | --- | --- | --- |",
          f"| teacher | {fids(h['teacher_fid'])} | {h['teacher_is']:.2f} | {100 * h['teacher_accuracy']:.1f}% | "
          f"{h['teacher_sec_per_image']:.4f} |",
          f"| student | {fids(h['student_fid'])} | {h['student_is']:.2f} | {100 * h['student_accuracy']:.1f}% | "
          f"{h['student_sec_per_image']:.4f} |", "",
          f"Student / teacher FID {np.mean(h['student_fid']) / np.mean(h['teacher_fid']):.2f}x, speed-up "
          f"{h['speedup']:.1f}x. Same shape as the paper (the student within MARVAL-B's 1.18x of its teacher or "
          f"within the noise)? {yes(sh['student_near_teacher'])}.", "",
          "![real, teacher and student digits](grids.png)", "",
          "## CFG sweep", "",
          "Paper: MARVAL-B w = 1 / 1.2 / 2 / 4 -> FID 3.75 / 3.06 / 7.98 / 13.84, IS rising with w (read as MAR's "
          f"cfg). Here: a student distilled at each teacher cfg for {s['sweep_distill_epochs']} epochs (the default "
          f"student: {s['distill_epochs']}), first seed set; the teacher at that cfg beside it.", "",
          "| cfg | student FID | student IS | precision | recall | accuracy | teacher FID | teacher IS |",
          "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    md += [f"| {r['cfg']:g} | {r['fid']:.2f} | {r['is']:.2f} | {r['precision']:.3f} | {r['recall']:.3f} | "
           f"{100 * r['accuracy']:.1f}% | {r['teacher_fid']:.2f} | {r['teacher_is']:.2f} |" for r in rep["cfg_sweep"]]
    if "cfg_is_rises_with_cfg" in sh:
        md += ["", f"Same shape as the paper? IS rises with cfg: {yes(sh['cfg_is_rises_with_cfg'])}; FID has its "
                   "minimum at a small cfg (<= 1.5, within noise) and rises at the largest: "
                   f"{yes(sh['cfg_fid_min_at_small_cfg'])}."]
    md += ["", "![FID against IS](fig_cfg.png)", "", "## AR iterations K: speed against quality", "",
           "Paper: N_AR = 64 for RL, 128 for evaluation (MAR: the transformer's cost grows with K, the head's is fixed "
           "per token). First seed set; seconds from the sampling call itself.", "",
           "| K | teacher FID | student FID | teacher s / image | student s / image | speed-up |",
           "| --- | --- | --- | --- | --- | --- |"]
    md += [f"| {r['num_iter']} | {r['teacher_fid']:.2f} | {r['student_fid']:.2f} | {r['teacher_sec_per_image']:.4f} | "
           f"{r['student_sec_per_image']:.4f} | {r['speedup']:.1f}x |" for r in rep["num_iter_sweep"]]
    if "speedup_shrinks_with_k" in sh:
        md += ["", f"The speed-up shrinks as K grows: {yes(sh['speedup_shrinks_with_k'])}."]
    md += ["", "![FID against seconds per image](fig_num_iter.png)", "", "## Model size", "",
           "Paper: MARVAL-B 3.06, MARVAL-H 2.00 (FID falls with size). Here: each size trained and distilled with "
           f"the same schedule; {len(s['seeds'])} seed sets.", "",
           "| size | width / depth | parameters | teacher FID | student FID | teacher s / image | student s / image |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    md += [f"| {r['size']} | {r['width']} / {r['depth']} | {r['params'] / 1e6:.2f}M | {r['teacher_fid']:.2f} | "
           f"{r['student_fid']:.2f} | {r['teacher_sec_per_image']:.4f} | {r['student_sec_per_image']:.4f} |"
           for r in rep["model_size"]]
    if "larger_model_lower_teacher_fid" in sh:
        md += ["", "The largest model has the lowest FID (beyond noise): teacher "
                   f"{yes(sh['larger_model_lower_teacher_fid'])}, student {yes(sh['larger_model_lower_student_fid'])}."]
    md += ["", "## Diversity (the paper's open question 3)", "",
           "Improved precision / recall (k = 3) on the toy classifier's features against the held-out digits, "
           f"{len(s['seeds'])} seed sets; a real training subset of the same size gives the ceiling.", "",
           "| | precision | recall |", "| --- | --- | --- |",
           f"| real (training digits) | {div['real_precision']:.3f} | {div['real_recall']:.3f} |",
           f"| teacher | {div['teacher_precision']:.3f} | {div['teacher_recall']:.3f} |",
           f"| student | {div['student_precision']:.3f} | {div['student_recall']:.3f} |", "",
           "Per-class recall (mode coverage), digits 0-9: teacher "
           + ", ".join(f"{v:.2f}" for v in div["teacher_class_recall"]) + "; student "
           + ", ".join(f"{v:.2f}" for v in div["student_class_recall"]) + ".", "",
           f"Student recall >= 0.9x the teacher's: {yes(sh['student_recall_at_least_0.9x_teacher'])}.", "",
           "![per-class recall](fig_diversity.png)", "", "## RL: the reward, an independent judge, a second reward",
           "", "Paper (MARVAL-B, PickScore-trained): CLIP 29.40 -> 29.47, ImageReward -0.142 -> -0.110. Here: reward = "
           "log p(digit) under the CNN classifier (PickScore's role); independent judge: a pixel MLP (another "
           "architecture and seed, never seen by the policy); second reward: the MLP's class similarity (CLIP's role). "
           f"{len(s['seeds'])} evaluation seed sets that the RL checkpoint selection never saw.", "",
           "| | reward (log p) | accuracy | independent accuracy | second reward | toy FID |",
           "| --- | --- | --- | --- | --- | --- |"]
    md += [f"| {at} RL | {rl[f'reward_{at}']:.4f} | {100 * rl[f'accuracy_{at}']:.1f}% | "
           f"{100 * rl[f'independent_accuracy_{at}']:.1f}% | {rl[f'second_reward_{at}']:.4f} | {rl[f'fid_{at}']:.2f} |"
           for at in ("before", "after")]
    md += ["", f"RL raises the reward: {yes(sh['rl_raises_reward'])}; without lowering the independent accuracy "
               f"(by more than a point): {yes(sh['rl_keeps_independent_accuracy'])}.", "",
           "![reward against FID over training; accuracies](fig_rl.png)", "",
           "Stage and section times (s), each as measured when it ran: "
           + ", ".join(f"{k} {v:.0f}" for k, v in rep["seconds"].items()), ""]
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write("\n".join(md))
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(rep, f, indent=2)
    print("\n".join(md))


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------


def main(argv=None):
    p = demo.build_parser(__doc__, "runs/experiments")
    p.add_argument("--cfgs", default="1.0,1.2,1.5,2.0,3.0", help="teacher CFGs of the sweep (comma-separated)")
    p.add_argument("--sweep-distill-epochs", type=common.COUNT, default=20,
                   help="distillation epochs of each sweep student")
    p.add_argument("--num-iters", default="1,2,4,8,16", help="AR iterations K of the sweep")
    p.add_argument("--sizes", default="small,base", help=f"toy sizes of the model-size table, from "
                                                          f"{','.join(data.TOY_SIZES)}")
    p.add_argument("--seed-sets", type=common.COUNT, default=3,
                   help="evaluation seed sets (demo.EVAL_SEEDS and beyond)")
    p.add_argument("--redraw", default=None, metavar="REPORT_JSON",
                   help="only redraw the figures into --out-dir from a report.json's numbers (no training)")
    # The student of the headline and the model-size table gets distill_gsim.py's full toy schedule (30 epochs); the
    # demo shortens it to 20 to fit its ten minutes. A demo folder copied in therefore shares only its teacher.
    p.set_defaults(distill_epochs=30)
    args = demo.parse(p, argv)
    if args.redraw:  # the figures from recorded numbers: seconds, not the half hour of the sections
        os.makedirs(args.out_dir, exist_ok=True)
        with open(common.input_path("--redraw", args.redraw, "a report.json written by experiments.py")) as f:
            draw_figures(json.load(f), args.out_dir)
        return None
    args.cfgs = [float(v) for v in args.cfgs.split(",")]
    args.num_iters = [int(v) for v in args.num_iters.split(",")]
    args.sizes = args.sizes.split(",")
    for size in args.sizes:
        data.toy_config(size)  # unknown names fail here, before any training
    if args.eval_images < 40:
        p.error(f"--eval-images {args.eval_images}: the per-class recall needs at least 4 digits of each class "
                "(k = 3 neighbours), so at least 40")
    os.makedirs(args.out_dir, exist_ok=True)
    t0 = time.time()
    seeds = [demo.EVAL_SEEDS[0] + 1000 * i for i in range(args.seed_sets)]  # 50000, 51000, 52000: demo.EVAL_SEEDS

    # -- the demo's pipeline (VAE, teacher, student, RL), the RL run watched by the independent classifier --------
    # The independent judge exists before RL starts so that RL logs its accuracy at every evaluation (the figure's
    # right panel). It is a pixel MLP with its own seed: were it the reward's CNN with another seed, adversarial
    # directions found against one CNN would partly transfer to the other and the check would be weaker.
    watch = os.path.join(args.out_dir, "toy_watch_classifier.pt")
    evaluate.load_toy_classifier(watch, kind="mlp", seed=1)
    args.rl_args = args.rl_args + ["--watch-classifier", watch]
    d, clf, stage_seconds = demo.run_stages(args)
    ckpt = lambda name: os.path.join(d(name), "checkpoint-last.pth")
    rl_best = os.path.join(d("student_rl"), "checkpoint-best.pth")
    ev = evaluate.ToyEvaluator(clf)
    watcher = evaluate.ToyEvaluator(watch, kind="mlp", seed=1)
    teacher, student = demo.load_toy(ckpt("teacher")), demo.load_toy(ckpt("student"))
    rl = demo.load_toy(rl_best if os.path.exists(rl_best) else ckpt("student_rl"))

    # -- the sections, each cached under its settings -------------------------------------------------------------
    base = dict(teacher_epochs=args.teacher_epochs, distill_epochs=args.distill_epochs, teacher_cfg=args.teacher_cfg,
                num_iter=args.num_iter, eval_images=args.eval_images, seeds=seeds, teacher_args=args.teacher_args,
                distill_args=args.distill_args)
    sections = {
        "headline": ({"timing_images": args.timing_images},
                     lambda: headline_and_diversity(args, ev, teacher, student, seeds)),
        "num_iter_sweep": ({"num_iters": args.num_iters},
                           lambda: num_iter_sweep(args, ev, teacher, student, seeds[:1])),
        "cfg_sweep": ({"cfgs": args.cfgs, "epochs": args.sweep_distill_epochs},
                      lambda: cfg_sweep(args, ev, teacher, seeds[:1], clf, ckpt("teacher"))),
        "model_size": ({"sizes": args.sizes, "timing_images": args.timing_images},
                       lambda: model_size(args, ev, (ckpt("teacher"), ckpt("student")), seeds, clf,
                                          os.path.join(args.out_dir, "toy_vae.pt"))),
        "rl": ({"rl_steps": args.rl_steps, "rl_args": args.rl_args},
               lambda: rl_before_after(args, ev, watcher, student, rl, seeds))}
    rep, seconds = {}, stage_times(args.out_dir, stage_seconds)
    for name, (settings, compute) in sections.items():
        result = cached(args.out_dir, name, {**base, **settings}, compute)
        seconds[name] = result.pop("seconds")
        rep.update(result if name == "headline" else {name: result.get("rows", result)})
    rep["headline"]["real_floor_fid"] = ev.real_floor(args.eval_images)  # the floor at the sets' size (cheap)
    # the verdicts are computed from the numbers on every run, never written by hand
    rep["shapes"] = shapes(rep)
    rep["settings"] = {**base, "sweep_distill_epochs": args.sweep_distill_epochs, **common.machine()}
    rep["seconds"] = {**seconds, "all_stages_and_sections": sum(seconds.values()), "this_invocation": time.time() - t0}
    draw_figures(rep, args.out_dir)
    rl_fig = os.path.join(d("student_rl"), "reward_vs_fid.png")
    if os.path.exists(rl_fig):
        shutil.copyfile(rl_fig, os.path.join(args.out_dir, "fig_rl.png"))
    write_report(rep, args.out_dir)
    return rep


if __name__ == "__main__":
    common.cli(main)
