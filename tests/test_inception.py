"""evaluate.py's FID Inception against pytorch-fid's and torch-fidelity's, with the same random weights in a file;
FID / IS against their own metric functions; the end-to-end FID of PNG folders against torch-fidelity's."""
import numpy as np
import pytest
import torch

import evaluate


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Random FID-Inception weights in the TF-2015 file layout (BatchNorm statistics randomised too)."""
    torch.manual_seed(0)
    model = evaluate.FIDInception()
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn_like(b) * 0.1)
            elif name.endswith("running_var"):
                b.copy_(torch.rand_like(b) + 0.5)
        for name, p in model.named_parameters():
            if name.endswith("bn.weight"):
                p.copy_(torch.rand_like(p) + 0.5)
    sd = {k: v for k, v in model.state_dict().items() if "num_batches_tracked" not in k}
    path = tmp_path_factory.mktemp("inception") / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(sd, path)
    return str(path), sd


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (6, 3, 16, 16), dtype=np.uint8)  # smooth-ish images: upsampled noise
    return torch.from_numpy(base).float().repeat_interleave(4, 2).repeat_interleave(4, 3).to(torch.uint8)  # 64x64


def test_features_and_logits_match_pytorch_fid(weights, images, monkeypatch):
    import pytorch_fid.inception as pfi
    path, sd = weights
    monkeypatch.setattr(pfi, "load_state_dict_from_url", lambda *a, **k: dict(sd))  # no download: our file's weights
    ref_pool = pfi.InceptionV3([3], resize_input=False, normalize_input=False).eval()
    ref_full = pfi.fid_inception_v3().eval()
    ours = evaluate.load_inception(path)
    x = (evaluate.resize_bilinear_tf1(images.float(), 299) - 128) / 128  # the same normalised input for all
    with torch.no_grad():
        pool = ours.features(x)
        torch.testing.assert_close(pool, ref_pool(x)[0][:, :, 0, 0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours.fc(pool), ref_full(x), rtol=1e-4, atol=1e-4)


def test_uint8_pipeline_matches_torch_fidelity(weights, images):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    path, _ = weights
    ref = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                      feature_extractor_weights_path=path)
    ours = evaluate.load_inception(path)
    with torch.no_grad():
        f_ref, l_ref = ref(images)
        f, l = ours(images)
    torch.testing.assert_close(f, f_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(l, l_ref, rtol=1e-4, atol=1e-4)


def test_resize_matches_tensorflow1_semantics():
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
    x = torch.rand(2, 3, 37, 53) * 255
    torch.testing.assert_close(evaluate.resize_bilinear_tf1(x, 299),
                               interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False),
                               rtol=1e-5, atol=1e-3)


def test_fid_and_is_equal_the_reference_functions():
    from pytorch_fid.fid_score import calculate_frechet_distance
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_isc import isc_features_to_metric
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(300, 16)), rng.normal(0.3, 1.2, size=(300, 16))
    mu1, s1 = evaluate.feature_stats(a)
    mu2, s2 = evaluate.feature_stats(b)
    ours = evaluate.frechet_distance(mu1, s1, mu2, s2)
    assert ours == pytest.approx(calculate_frechet_distance(mu1, s1, mu2, s2), rel=1e-6)
    st1, st2 = fid_features_to_statistics(torch.from_numpy(a)), fid_features_to_statistics(torch.from_numpy(b))
    assert ours == pytest.approx(fid_statistics_to_metric(st1, st2, False)["frechet_inception_distance"], rel=1e-6)
    logits = torch.from_numpy(rng.normal(size=(503, 20)) * 3)  # 503: splits of unequal size, as torch-fidelity's
    for shuffle, seed in ((True, 2020), (False, None)):  # torch-fidelity shuffles with seed 2020 by default
        ref = isc_features_to_metric(logits, splits=10, shuffle=shuffle)
        mean, std = evaluate.inception_score(logits, splits=10, shuffle_seed=seed)
        assert mean == pytest.approx(ref["inception_score_mean"], rel=1e-6)
        assert std == pytest.approx(ref["inception_score_std"], rel=1e-5)


def test_missing_weights_file_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="Nothing is downloaded"):
        evaluate.load_inception(str(tmp_path / "nope.pth"))
    torch.save({"fc.weight": torch.zeros(1008, 2048)}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="missing"):
        evaluate.load_inception(str(tmp_path / "partial.pth"))
