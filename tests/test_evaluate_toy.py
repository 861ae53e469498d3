"""Metric math (analytic checks) and the toy evaluator."""
import numpy as np
import pytest
import torch

import data
import evaluate


def test_frechet_distance_analytic():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 8))
    mu, sigma = evaluate.feature_stats(a)
    assert evaluate.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-6)
    # diagonal Gaussians: ||mu1 - mu2||^2 + sum (s1 + s2 - 2 sqrt(s1 s2))
    s1, s2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    d = evaluate.frechet_distance(np.zeros(3), np.diag(s1), np.ones(3), np.diag(s2))
    assert d == pytest.approx(3.0 + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2)))
    with pytest.raises(ValueError, match="do not match"):
        evaluate.frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="at least 2"):
        evaluate.feature_stats(np.zeros((1, 4)))


def test_inception_score_extremes():
    # confident and uniform over classes: IS = number of classes; identical predictions: IS = 1
    one_hot = torch.eye(10).repeat(10, 1) * 50.0
    assert evaluate.inception_score(one_hot, splits=10, shuffle_seed=None)[0] == pytest.approx(10.0, rel=1e-4)
    same = torch.zeros(100, 10)
    assert evaluate.inception_score(same, splits=10)[0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="cannot be split"):
        evaluate.inception_score(torch.zeros(5, 10), splits=10)


def test_inception_score_does_not_depend_on_storage_order():
    """sample.py's PNG folder is sorted by class, its .npz shuffled: the IS must agree. 1,000 confident predictions
    of 10 classes (true IS 10): consecutive splits of the sorted order would hold one class each and score 1.0."""
    logits = torch.eye(10).repeat_interleave(100, dim=0) * 50.0         # (1000, 10), sorted by class
    perm = torch.from_numpy(np.random.RandomState(7).permutation(1000))
    sorted_is = evaluate.inception_score(logits)[0]
    shuffled_is = evaluate.inception_score(logits[perm])[0]
    assert sorted_is > 9 and shuffled_is > 9
    assert sorted_is == pytest.approx(shuffled_is, rel=0.05)
    assert evaluate.inception_score(logits, shuffle_seed=None)[0] == pytest.approx(1.0)  # what the bug gave


@pytest.fixture(scope="module")
def toy_eval(toy_classifier_file):
    return evaluate.ToyEvaluator(toy_classifier_file)


def test_toy_evaluator_on_real_and_broken_digits(toy_eval):
    x, y = data.toy_digits("heldout")
    real = toy_eval(x, y)
    assert real["accuracy"] > 0.93  # the classifier recognises real held-out digits
    assert real["toy_fid"] == pytest.approx(0.0, abs=1e-6)  # held-out against its own statistics
    floor = toy_eval.real_split_fid()
    assert 0 < floor < 5
    # wrong labels and noise must score badly
    assert toy_eval(x, (y + 1) % 10)["accuracy"] < 0.1
    noise = toy_eval(torch.rand_like(x) * 2 - 1, y)
    assert noise["toy_fid"] > 20 * floor and noise["accuracy"] < 0.3
    # the reward is differentiable in the images
    xg = x[:8].clone().requires_grad_(True)
    toy_eval.log_prob(xg, y[:8]).sum().backward()
    assert xg.grad.abs().sum() > 0


def test_real_floor_is_measured_at_the_generated_sets_size(toy_eval):
    """The floor a 400-digit FID is read against: 400 class-balanced training digits, not all 1,400. FID's bias
    grows as the sample shrinks, so the smaller sets score higher, and the same draw reproduces exactly."""
    full = toy_eval.real_split_fid()
    f400, f100 = toy_eval.real_floor(400), toy_eval.real_floor(100)
    assert full < f400 < f100
    assert toy_eval.real_floor(400) == f400 and toy_eval.real_floor(400, seed=1) != f400
    # one draw by hand: 40 training digits of each class against the held-out statistics
    x, y = data.toy_digits("train")
    g = torch.Generator().manual_seed(0)
    idx = torch.cat([torch.nonzero(y == c)[:, 0][torch.randperm(int((y == c).sum()), generator=g)[:40]]
                     for c in range(10)])
    by_hand = toy_eval(x[idx], y[idx])["toy_fid"]
    assert toy_eval.real_floor(400, draws=1) == pytest.approx(by_hand, rel=1e-4)
    with pytest.raises(ValueError, match="multiple of 10"):
        toy_eval.real_floor(405)
    with pytest.raises(ValueError, match="per class"):
        toy_eval.real_floor(10_000)
