"""experiments.py on a tiny configuration (its numbers are measured by running it, not here), the measurements it is
built from (precision / recall and per-class recall, the independent classifier and its class similarity), and the
toy sizes it trains. No timing assertions."""
import json
import shutil

import pytest
import torch
from PIL import Image

import figures
import data
import evaluate
import experiments
import mar


def test_experiments_driver_on_a_tiny_configuration(tmp_path, capsys, toy_vae_file, toy_classifier_file):
    shutil.copy(toy_vae_file, tmp_path / "toy_vae.pt")  # reuse a toy VAE (no 40 s training)
    shutil.copy(toy_classifier_file, tmp_path / "toy_classifier.pt")  # and the session's classifier
    argv = ["--out-dir", str(tmp_path), "--teacher-epochs", "1", "--distill-epochs", "1", "--sweep-distill-epochs",
            "1", "--rl-steps", "2", "--eval-images", "40", "--rl-eval-images", "40", "--timing-images", "10",
            "--cfgs", "1.2,3.0", "--num-iters", "1,4", "--sizes", "small,base", "--seed-sets", "2"]
    rep = experiments.main(argv)
    saved = json.load(open(tmp_path / "report.json"))
    assert {"headline", "cfg_sweep", "num_iter_sweep", "model_size", "diversity", "rl", "shapes"} <= set(saved)
    h = rep["headline"]
    assert len(h["teacher_fid"]) == len(h["student_fid"]) == 2
    assert all(h[k] > 0 for k in ("teacher_is", "student_is", "teacher_sec_per_image", "student_sec_per_image"))
    # the same seeds give the same images: every section that samples the teacher at (K = 4, cfg 1.2, first seed set)
    # must agree with the headline, so the tables can be read against each other
    k4 = next(r for r in rep["num_iter_sweep"] if r["num_iter"] == 4)
    w12 = next(r for r in rep["cfg_sweep"] if r["cfg"] == 1.2)
    base = next(r for r in rep["model_size"] if r["size"] == "base")
    assert k4["teacher_fid"] == pytest.approx(h["teacher_fid"][0]) == pytest.approx(w12["teacher_fid"])
    assert k4["student_fid"] == pytest.approx(h["student_fid"][0])
    assert base["teacher_fid_by_seed"] == pytest.approx(h["teacher_fid"])
    assert [r["cfg"] for r in rep["cfg_sweep"]] == [1.2, 3.0]
    assert all({"cfg", "fid", "is", "precision", "recall", "accuracy"} <= set(r) for r in rep["cfg_sweep"])
    assert [r["num_iter"] for r in rep["num_iter_sweep"]] == [1, 4]
    small = next(r for r in rep["model_size"] if r["size"] == "small")
    assert small["params"] < base["params"]           # the small size really is a smaller MAR
    assert data.toy_config_of(str(tmp_path / "model_size/small/student/checkpoint-last.pth"))["encoder_depth"] == 2
    assert data.toy_config_of(str(tmp_path / "student_rl" / "checkpoint-last.pth")) == data.TOY_MODEL  # RL keeps it
    div = rep["diversity"]
    assert len(div["teacher_class_recall"]) == len(div["student_class_recall"]) == 10
    assert all(0 <= v <= 1 for v in div["teacher_class_recall"] + [div["student_recall"], div["real_recall"]])
    assert div["real_recall"] > 0.8                  # real training digits cover the held-out ones
    rl = rep["rl"]
    for key in ("reward", "independent_accuracy", "fid", "second_reward"):
        assert f"{key}_before" in rl and f"{key}_after" in rl
    history = json.load(open(tmp_path / "student_rl" / "eval.json"))["start"]
    assert "independent_accuracy" in history          # the RL run was watched by the independent classifier
    for fig in ("grids.png", "fig_cfg.png", "fig_num_iter.png", "fig_diversity.png", "fig_rl.png"):
        with Image.open(tmp_path / fig) as im:
            assert im.width >= 500
    md = open(tmp_path / "report.md").read()
    for counterpart in ("3.75 / 3.06 / 7.98 / 13.84", "CLIP 29.40 -> 29.47", "MARVAL-H 2.00", "open question 3"):
        assert counterpart in md
    capsys.readouterr()
    experiments.main(argv)                            # a second run trains and measures nothing
    out = capsys.readouterr().out
    assert out.count("[experiments]") == 5 and out.count("reusing") == 5 + 3
    with pytest.raises(SystemExit):
        experiments.main(argv[:-1] + ["1"] + ["--eval-images", "20"])  # per-class recall needs >= 40 digits


def test_shapes_are_read_against_the_noise():
    """Each shape verdict flips when the numbers do, and differences inside the seed-set noise are not read as a
    shape: a student 1.3x its teacher fails the headline shape, one 1.3 FID worse with a noise of 1.5 passes it."""
    def report(teacher, student, cfg_fids, cfg_is, recall, reward_after):
        return {"headline": {"teacher_fid": teacher, "student_fid": student},
                "cfg_sweep": [{"cfg": w, "fid": f, "is": i} for w, f, i in zip((1.0, 1.5, 3.0), cfg_fids, cfg_is)],
                "num_iter_sweep": [{"speedup": 20.0}, {"speedup": 10.0}],
                "rl": {"reward_before": 0.0, "reward_after": reward_after, "independent_accuracy_before": 0.9,
                       "independent_accuracy_after": 0.9},
                "diversity": {"teacher_recall": 0.8, "student_recall": recall},
                "model_size": [{"params": 1, "teacher_fid": 20.0, "student_fid": 20.0},
                               {"params": 2, "teacher_fid": 10.0, "student_fid": 20.5}]}
    good = experiments.shapes(report([10, 10, 10], [11.5, 11.5, 11.5], [9, 8, 15], [5, 6, 7], 0.75, 0.1))
    assert all(v for k, v in good.items() if k not in ("fid_noise", "larger_model_lower_student_fid"))
    assert not good["larger_model_lower_student_fid"]  # 20.5 vs 20.0: no size effect inside the noise
    assert all(isinstance(v, bool) for k, v in good.items() if k != "fid_noise")  # JSON-serialisable
    bad = experiments.shapes(report([10, 10, 10], [13, 13, 13], [15, 9, 8], [7, 6, 5], 0.7, -0.1))
    assert not any(bad[k] for k in ("student_near_teacher", "cfg_is_rises_with_cfg", "cfg_fid_min_at_small_cfg",
                                    "student_recall_at_least_0.9x_teacher", "rl_raises_reward"))
    noisy = experiments.shapes(report([5.5, 7, 8.5], [6.8, 8.3, 9.8], [9, 8, 15], [5, 6, 7], 0.75, 0.1))
    assert noisy["fid_noise"] == pytest.approx(1.5) and noisy["student_near_teacher"]  # 1.19x, but 1.3 < the noise


def test_precision_recall_sees_copies_and_collapse():
    """The diversity numbers are right at the two ends: a copy of the reference has precision, recall and every
    class's recall 1; a collapsed generator (one image for every label) has recall near 0."""
    class Identity:  # features = pixels, so the test needs no trained classifier
        ref_feats = data.toy_digits("heldout")[0].flatten(1).numpy()

        def __call__(self, imgs, labels):
            return {"toy_fid": 0.0, "toy_is": 1.0, "accuracy": 1.0}

        def features(self, imgs):
            return imgs.flatten(1).numpy()
    x, y = data.toy_digits("heldout")
    copy = experiments.score(Identity(), x, y, diversity=True)
    assert copy["precision"] == copy["recall"] == 1.0 and copy["class_recall"] == [1.0] * 10
    collapsed = experiments.score(Identity(), x[:1].repeat(len(x), 1, 1, 1), y, diversity=True)
    assert collapsed["recall"] < 0.05 and max(collapsed["class_recall"]) < 0.2


def test_independent_classifier_and_class_similarity(tmp_path):
    """The watcher is another architecture (a pixel MLP), saved with its kind and reloaded as it; its class
    similarity prefers an image's own class to the wrong one."""
    path = str(tmp_path / "watch.pt")
    net = evaluate.load_toy_classifier(path, kind="mlp", seed=1)
    assert isinstance(net.body[1], torch.nn.Linear) and mar.read_checkpoint(path)["kind"] == "mlp"
    ev = evaluate.ToyEvaluator(path)                  # the file says "mlp": no kind needed to reload it
    assert isinstance(ev.net.body[1], torch.nn.Linear)
    x, y = data.toy_digits("heldout")
    assert ev(x, y)["accuracy"] > 0.9
    right, wrong = ev.similarity(x, y), ev.similarity(x, (y + 1) % 10)
    assert right.shape == (len(x),) and right.mean() > wrong.mean() + 0.1
    cnn = evaluate.ToyClassifier()
    with pytest.raises(ValueError, match="does not fit"):  # a CNN state dict does not load into the MLP
        mar.load_state_dict_strict(evaluate.ToyClassifier("mlp"), cnn.state_dict())


def test_toy_sizes():
    sizes = {name: sum(p.numel() for p in mar.MAR(**data.toy_config(name)).parameters()) for name in data.TOY_SIZES}
    assert sizes["small"] < sizes["base"] < sizes["large"]
    assert data.toy_config("base") == data.TOY_MODEL
    with pytest.raises(ValueError, match="unknown toy size 'huge'"):
        data.toy_config("huge")


def test_plot_panels(tmp_path):
    path = str(tmp_path / "f.png")
    figures.plot_panels([dict(title="a", xlabel="x", ylabel="y", series=[("s", [(0, 0, "p"), (1, 2, None)])]),
                        dict(title="b", xlabel="x", ylabel="y", series=[])], path)
    with Image.open(path) as im:
        assert im.size == (2 * 520, 400)
        colors = {c for _, c in im.convert("RGB").getcolors(1 << 16)}
    assert (70, 130, 180) in colors                   # the first series is drawn (steelblue)
