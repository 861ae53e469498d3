"""demo.py's pipeline with a few steps per stage (its numbers are measured by running it, not here), and bench.py's
output structure. No timing assertions: speed lives in bench.py runs."""
import json
import os
import shutil

import pytest
from PIL import Image

import bench
import demo


def test_demo_pipeline_runs_and_reuses_finished_stages(tmp_path, capsys, toy_vae_file, toy_classifier_file):
    shutil.copy(toy_vae_file, tmp_path / "toy_vae.pt")  # the demo reuses a toy VAE in its folder (no 40 s training)
    shutil.copy(toy_classifier_file, tmp_path / "toy_classifier.pt")  # and the classifier (trained once per session)
    argv = ["--out-dir", str(tmp_path), "--teacher-epochs", "1", "--distill-epochs", "1", "--rl-steps", "2",
            "--eval-images", "20", "--rl-eval-images", "20", "--timing-images", "10",
            "--rl-args=--eval-every 1 --global-batch-size 4"]
    report = demo.main(argv)
    for name in ("teacher", "student", "student_rl"):
        assert {"toy_fid", "toy_is", "accuracy", "reward", "sec_per_image", "speedup"} <= set(report[name])
        assert os.path.exists(tmp_path / f"grid_{name}.png")
        assert len(report[name]["toy_fid_by_seed"]) == 3
        assert report[name]["toy_fid"] == pytest.approx(sum(report[name]["toy_fid_by_seed"]) / 3)
    with Image.open(tmp_path / "grids.png") as im:  # real, teacher, student, RL side by side: 4 panels of 8 columns
        assert im.width > 4 * 8 * 17 * 3 and im.height > 10 * 17 * 3
    assert report["teacher"]["speedup"] == 1.0 and 0 < report["real_split_fid"] < report["real_floor_fid"]
    assert report["student"]["speedup"] == pytest.approx(report["teacher"]["sec_per_image"]
                                                         / report["student"]["sec_per_image"])
    assert json.load(open(tmp_path / "report.json"))["student"]["toy_fid"] == report["student"]["toy_fid"]
    assert "| student_rl |" in open(tmp_path / "report.md").read()
    machine = report["settings"]  # what the times ran on, beside them: they scale with the matmul throughput
    assert machine["threads"] >= 1 and machine["matmul_gflops"] > 0
    assert machine["cpu"] in open(tmp_path / "report.md").read()
    capsys.readouterr()
    demo.main(argv)  # a second run trains nothing
    out = capsys.readouterr().out
    assert out.count("reusing") == 3


def test_demo_refuses_eval_sizes_that_are_not_class_balanced(tmp_path, capsys):
    with pytest.raises(SystemExit):  # refused before any training, with the reason
        demo.main(["--out-dir", str(tmp_path), "--eval-images", "25"])
    assert "multiple of 10" in capsys.readouterr().err and not os.listdir(tmp_path)


def test_bench_reports_the_documented_keys(tmp_path):
    out = bench.main(["--model", "mar_tiny", "--num-iter", "2", "--repeats", "1", "--num-diffusion-steps", "5",
                      "--json", str(tmp_path / "b.json")])
    keys = {"model", "device", "cpu", "threads", "matmul_gflops", "batch", "num_iter", "teacher_sec_per_image",
            "student_sec_per_image", "speedup", "lower_bound_sec_per_image", "student_over_lower_bound"}
    assert keys <= set(out) and keys <= set(json.load(open(tmp_path / "b.json")))
    assert all(out[k] > 0 for k in ("teacher_sec_per_image", "student_sec_per_image", "lower_bound_sec_per_image"))
