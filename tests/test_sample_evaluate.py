"""sample.py (DDP layout, files, world-size independence) and evaluate.py's command line."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import sample
from test_train_mar import torchrun


def run_sample(ckpt, out, extra=()):
    sample.main(["--preset", "toy", "--ckpt", ckpt, "--num-images", "20", "--num-iter", "3", "--batch-size", "4",
                 "--out-dir", out, *extra])
    with np.load(os.path.join(out, "samples.npz")) as d:
        return d["arr_0"], d["labels"], d["index"]


def test_sample_outputs(toy_student_ckpt, tmp_path):
    out = str(tmp_path / "s")
    arr, labels, index = run_sample(toy_student_ckpt, out, ["--one-step"])
    assert arr.shape == (20, 16, 16, 1) and arr.dtype == np.uint8
    assert sorted(index.tolist()) == list(range(20)) and index.tolist() != list(range(20))  # stored shuffled
    assert np.bincount(labels, minlength=10).tolist() == [2] * 10                         # balanced classes
    assert np.array_equal(labels, index // 2)                                             # label of global index
    png = np.array(Image.open(os.path.join(out, "images", f"{index[0]:05d}.png")))
    assert np.array_equal(png, arr[0, ..., 0])                                            # npz = the PNGs
    assert len({a.tobytes() for a in arr}) == 20                                          # N distinct images
    info = json.load(open(os.path.join(out, "sample.json")))
    assert info["num_images"] == 20 and info["images_per_sec"] > 0
    assert os.path.exists(os.path.join(out, "grid.png"))


@pytest.mark.parametrize("mode", [["--one-step"], ["--num-diffusion-steps", "2", "--cfg", "1.5"]])
def test_sampling_keeps_no_graph(toy_ckpt, toy_student_ckpt, tmp_path, monkeypatch, mode):
    """sample.py's latents carry no autograd graph (student and teacher). With one, FID-50K at MAR-B, 64 images per
    GPU and K = 64 would hold every AR step's activations: out of memory on the first batch (bench.py --dry-run)."""
    seen = []
    original = sample.mar.MAR.sample_tokens

    def spy(self, *a, **kw):
        out = original(self, *a, **kw)
        seen.append((torch.is_grad_enabled(), out.requires_grad))
        return out

    monkeypatch.setattr(sample.mar.MAR, "sample_tokens", spy)
    run_sample(toy_student_ckpt if "--one-step" in mode else toy_ckpt, str(tmp_path / "s"), mode)
    assert len(seen) == 5 and seen == [(False, False)] * 5  # 20 images in batches of 4


def test_teacher_mode_and_bad_counts(toy_ckpt, tmp_path):
    arr, _, _ = run_sample(toy_ckpt, str(tmp_path / "t"), ["--num-diffusion-steps", "5", "--cfg", "1.5"])
    assert arr.shape == (20, 16, 16, 1)
    with pytest.raises(sample.common.UsageError, match="multiple of the 10 classes"):
        sample.main(["--preset", "toy", "--ckpt", toy_ckpt, "--num-images", "15", "--out-dir", str(tmp_path / "x")])


def test_two_process_sampling_equals_one_process(toy_student_ckpt, tmp_path):
    one, _, _ = run_sample(toy_student_ckpt, str(tmp_path / "one"), ["--one-step"])
    out = str(tmp_path / "two")
    r = torchrun("sample.py", ["--preset", "toy", "--ckpt", toy_student_ckpt, "--num-images", "20", "--num-iter", "3",
                               "--batch-size", "4", "--one-step", "--out-dir", out])
    assert r.returncode == 0, r.stderr[-3000:]
    with np.load(os.path.join(out, "samples.npz")) as d:
        two = d["arr_0"]
    assert np.array_equal(one, two)  # bit-identical: same per-image generators and the same batches


def test_toy_evaluation_cli(toy_student_ckpt, toy_classifier_file, tmp_path):
    out = str(tmp_path / "s")
    run_sample(toy_student_ckpt, out, ["--one-step"])
    res = evaluate.main(["--toy", "--samples", os.path.join(out, "samples.npz"), "--classifier",
                         toy_classifier_file, "--json", str(tmp_path / "m.json")])
    assert {"toy_fid", "toy_is", "accuracy"} <= set(res) and res["num_images"] == 20
    assert json.load(open(tmp_path / "m.json"))["toy_fid"] == pytest.approx(res["toy_fid"])


def write_pngs(folder, arr):
    os.makedirs(folder, exist_ok=True)
    for i, a in enumerate(arr):
        Image.fromarray(a).save(os.path.join(folder, f"{i:05d}.png"))


def test_fid_of_png_folders_equals_torch_fidelity(tmp_path, monkeypatch):
    """Same PNGs, same (random) weights file: our FID equals torch-fidelity's calculate_metrics within 0.1%."""
    import torch_fidelity
    torch.manual_seed(0)
    model = evaluate.FIDInception()
    with torch.no_grad():
        for n, b in model.named_buffers():
            if n.endswith("running_var"):
                b.fill_(1.0)
    wpath = str(tmp_path / "inception.pth")
    torch.save({k: v for k, v in model.state_dict().items() if "num_batches_tracked" not in k}, wpath)
    rng = np.random.default_rng(0)
    a = (rng.integers(0, 256, (24, 8, 8, 3)).repeat(4, 1).repeat(4, 2)).astype(np.uint8)     # 32x32 blocky
    b = np.clip(a.astype(int) + rng.integers(-60, 60, a.shape), 0, 255).astype(np.uint8)
    write_pngs(tmp_path / "a", a)
    write_pngs(tmp_path / "b", b)
    np.savez(tmp_path / "ref.npz", arr_0=a)  # reference statistics computed from arr_0
    ours = evaluate.main(["--samples", str(tmp_path / "b"), "--ref-stats", str(tmp_path / "ref.npz"),
                          "--inception-weights", wpath, "--device", "cpu"])
    theirs = torch_fidelity.calculate_metrics(input1=str(tmp_path / "b"), input2=str(tmp_path / "a"), fid=True,
                                              feature_extractor_weights_path=wpath, cuda=False, verbose=False,
                                              save_cpu_ram=True)
    assert ours["fid"] == pytest.approx(theirs["frechet_inception_distance"], rel=1e-3)
    assert 0 <= ours["precision"] <= 1 and 0 <= ours["recall"] <= 1


def test_evaluate_errors(tmp_path):
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((20, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        evaluate.load_samples(str(tmp_path / "float.npz"))
    np.savez(tmp_path / "noarr.npz", images=np.zeros((20, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="arr_0"):
        evaluate.load_samples(str(tmp_path / "noarr.npz"))
    np.savez(tmp_path / "few.npz", arr_0=np.zeros((3, 8, 8, 3), np.uint8))
    np.savez(tmp_path / "badref.npz", something=np.zeros(3))
    torch.save({}, tmp_path / "w.pth")
    with pytest.raises(evaluate.common.UsageError, match="too few"):
        evaluate.main(["--samples", str(tmp_path / "few.npz"), "--ref-stats", str(tmp_path / "badref.npz"),
                       "--inception-weights", str(tmp_path / "w.pth")])
    with pytest.raises(ValueError, match="no .png"):
        evaluate.load_samples(str(tmp_path))
    np.savez(tmp_path / "ref64.npz", arr_0=np.zeros((12, 64, 64, 3), np.uint8))
    np.savez(tmp_path / "s32.npz", arr_0=np.zeros((12, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="reference's resolution"):
        evaluate.reference_stats(str(tmp_path / "ref64.npz"), None, "cpu", 4, (32, 32, 3))
    (tmp_path / "garbage.npz").write_bytes(b"\x93NUMPY" + bytes(range(256)) * 4)  # not a zip, not an array
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    for bad in ("garbage.npz", "objects.npy"):
        with pytest.raises(ValueError, match="not an ADM .npz"):
            evaluate.load_samples(str(tmp_path / bad))
        with pytest.raises(ValueError, match="not an ADM .npz"):
            evaluate.reference_stats(str(tmp_path / bad), None, "cpu", 4)


def test_precision_recall_analytic():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(400, 4))
    same = rng.normal(size=(400, 4))
    collapsed = rng.normal(size=(400, 4)) * 0.05  # a collapsed generator: precise but no recall
    p, r = evaluate.precision_recall(real, same)
    assert p > 0.8 and r > 0.8
    p, r = evaluate.precision_recall(real, collapsed)
    assert p > 0.95 and r < 0.2
    p, r = evaluate.precision_recall(real, real + 10)  # disjoint supports
    assert p == 0 and r == 0
