"""The FID Inception network and the Fréchet distance (docs/face_models.md §4, docs/guide.md §4.4)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from guide_fast.errors import CheckpointError, InputError
from guide_fast.fid import (
    FIDInception,
    build_inception,
    feature_statistics,
    fid_from_features,
    frechet_distance,
    inception_features,
    load_inception,
    trace_sqrt_product,
)

from reference_data import KEYLISTS  # noqa: E402


def _keylist(name):
    path = KEYLISTS / name
    if not path.exists():
        pytest.skip(f"reference key list {path} not available")
    rows = [line.rstrip("\n").split("\t") for line in path.read_text().splitlines() if line.strip()]
    return [(r[0], r[1], r[2]) for r in rows]


def _shape(t):
    return "scalar" if t.ndim == 0 else "x".join(str(s) for s in t.shape)


@pytest.fixture(scope="module")
def inception():
    return build_inception(seed=0)


@pytest.fixture(scope="module")
def weight_file(tmp_path_factory, inception):
    path = tmp_path_factory.mktemp("fid") / "pt_inception-random.pth"
    torch.save(inception.state_dict(), path)
    return path


# ------------------------------------------------------------------------ Fréchet distance
def _random_gaussians(rng, d, n):
    a = rng.standard_normal((n, d))
    b = rng.standard_normal((n, d)) @ (np.eye(d) + 0.3 * rng.standard_normal((d, d))) + 0.5
    return a, b


def test_frechet_distance_equals_direct_scipy_computation():
    scipy = pytest.importorskip("scipy")
    import scipy.linalg

    rng = np.random.default_rng(0)
    a, b = _random_gaussians(rng, 24, 200)
    mu1, s1 = a.mean(0), np.cov(a, rowvar=False)
    mu2, s2 = b.mean(0), np.cov(b, rowvar=False)
    direct = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(direct, rel=1e-9)
    # An independent route: tr sqrt(S1 S2) = tr sqrt(S1^1/2 S2 S1^1/2), the latter symmetric PSD.
    root1 = scipy.linalg.sqrtm(s1).real
    sym = np.trace(scipy.linalg.sqrtm(root1 @ s2 @ root1).real)
    assert trace_sqrt_product(s1, s2) == pytest.approx(sym, rel=1e-7)
    assert frechet_distance(mu1, s1, mu2, s2, method="eigh") == pytest.approx(direct, rel=1e-7)
    assert fid_from_features(a, b) == pytest.approx(direct, rel=1e-9)


def test_frechet_distance_closed_form_for_diagonal_covariances():
    pytest.importorskip("scipy")
    # Commuting covariances: FID = |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2.
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    expected = 1 + 0 + 4 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b), method="eigh") == pytest.approx(expected, rel=1e-12)


def test_fid_of_a_set_with_itself_is_zero():
    pytest.importorskip("scipy")
    rng = np.random.default_rng(1)
    feats = rng.standard_normal((300, 64))
    assert abs(fid_from_features(feats, feats)) < 1e-6
    assert abs(fid_from_features(feats, feats, method="eigh")) < 1e-6
    assert fid_from_features(feats, feats + 0.1) == pytest.approx(64 * 0.01, rel=1e-6)  # pure mean shift


def test_frechet_distance_retries_singular_product_with_offset():
    pytest.importorskip("scipy")
    # Fewer samples than dimensions: S1 S2 is singular, sqrtm of it is not finite or complex;
    # the pytorch-fid retry (1e-6 * I) or the real-part rule must give a finite value.
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((5, 16)), rng.standard_normal((5, 16))
    value = fid_from_features(a, b)
    assert np.isfinite(value)
    assert value == pytest.approx(fid_from_features(a, b, method="eigh"), rel=1e-3, abs=1e-3)


def test_frechet_distance_rejects_bad_inputs():
    with pytest.raises(InputError, match="shape"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(InputError, match="covariances"):
        frechet_distance(np.zeros(3), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(InputError, match="at least 2"):
        feature_statistics(np.zeros((1, 8)))
    with pytest.raises(InputError, match="non-finite"):
        feature_statistics(np.full((3, 8), np.nan))
    with pytest.raises(InputError, match="method"):
        trace_sqrt_product(np.eye(2), np.eye(2), method="svd")


def test_feature_statistics_match_numpy():
    feats = np.random.default_rng(3).standard_normal((50, 7))
    mu, sigma = feature_statistics(feats)
    np.testing.assert_allclose(mu, feats.mean(axis=0))
    np.testing.assert_allclose(sigma, np.cov(feats, rowvar=False))  # unbiased, as pytorch-fid


# ------------------------------------------------------------------------ Inception network
def test_state_dict_names_shapes_and_order_match_the_weight_file(inception):
    rows = _keylist("inception3_fid_file_keys.tsv")
    state = inception.state_dict()
    assert [r[0] for r in rows] == list(state)
    assert [r[1] for r in rows] == [_shape(t) for t in state.values()]
    params = dict(inception.named_parameters())
    assert [r[0] for r in rows if r[2] == "param"] == list(params)
    assert sum(p.numel() for p in params.values()) == 23_850_960  # docs/face_models.md §4.3


def test_every_conv_matches_the_reference_conv_table(inception):
    rows = _keylist("inception_convs.tsv")
    convs = {n: m for n, m in inception.named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert len(convs) == len(rows) == 94
    for name, cin, cout, kernel, stride, padding in (r.split("\t") for r in
                                                     (KEYLISTS / "inception_convs.tsv").read_text().splitlines()):
        m = convs[name]
        assert (m.in_channels, m.out_channels) == (int(cin), int(cout)), name
        assert (str(m.kernel_size), str(m.stride), str(m.padding)) == (kernel, stride, padding), name
        assert m.bias is None
    assert all(m.eps == 0.001 for m in inception.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_loads_into_torchvision_inception3_naming(inception):
    """The file's naming is torchvision's Inception3 (num_classes=1008, no aux head): our state
    dict loads strictly into it, and the blocks the FID patches leave alone agree exactly."""
    tv = pytest.importorskip("torchvision")
    ref = tv.models.inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
    ref.load_state_dict(inception.state_dict(), strict=True)
    ref.eval()
    x = torch.randn(2, 288, 35, 35)
    with torch.no_grad():
        torch.testing.assert_close(inception.Mixed_6a(x), ref.Mixed_6a(x))  # InceptionB, unpatched
        y = torch.randn(2, 768, 17, 17)
        torch.testing.assert_close(inception.Mixed_7a(y), ref.Mixed_7a(y))  # InceptionD, unpatched
        # InceptionA: torchvision's pool branch counts the zero padding; the FID patch does not.
        # They agree away from the border and differ on it.
        z = torch.rand(2, 192, 35, 35) + 0.5
        ours, theirs = inception.Mixed_5b(z), ref.Mixed_5b(z)
        torch.testing.assert_close(ours[..., 1:-1, 1:-1], theirs[..., 1:-1, 1:-1])
        pool = slice(224, 256)  # [1x1 64, 5x5 64, 3x3dbl 96, pool 32]
        torch.testing.assert_close(ours[:, :pool.start], theirs[:, :pool.start])
        assert not torch.allclose(ours[:, pool, 0, :], theirs[:, pool, 0, :])


def test_fid_pooling_patches():
    """Exact reference for the patched pool branches: TF average pooling excludes padding
    (a corner averages 4 values, not 9 / 9); the last block max-pools."""
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    from guide_fast.fid import _avg_pool_tf

    assert _avg_pool_tf(x)[0, 0, 0, 0].item() == pytest.approx((0 + 1 + 4 + 5) / 4)
    block = build_inception(seed=1).Mixed_7c
    assert block.pool == "max"
    assert build_inception(seed=1).Mixed_7b.pool == "avg"


def test_forward_gives_2048_features_and_follows_the_fid_preprocessing(inception):
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        feats = inception(images)
    assert feats.shape == (2, 2048) and feats.dtype == torch.float32
    assert torch.isfinite(feats).all() and feats.std() > 0
    assert not torch.allclose(feats[0], feats[1])
    # The forward is: resize to 299 (bilinear, align_corners=False) -> 2x - 1 -> network -> mean pool.
    x = 2 * F.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False) - 1
    with torch.no_grad():
        for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"):
            x = getattr(inception, name)(x)
        x = F.max_pool2d(x, 3, 2)
        x = inception.Conv2d_4a_3x3(inception.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, 2)
        for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
                     "Mixed_7a", "Mixed_7b", "Mixed_7c"):
            x = getattr(inception, name)(x)
        assert x.shape[1:] == (2048, 8, 8)
        torch.testing.assert_close(feats, x.mean((2, 3)))
    batched = inception_features(inception, images, batch_size=1)
    np.testing.assert_allclose(batched, feats.double().numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(InputError, match=r"\[N, 3, H, W\]"):
        inception(torch.rand(3, 64, 64))


# ------------------------------------------------------------------------ loading
def test_load_roundtrip_and_hash(weight_file, inception):
    model = load_inception(weight_file)
    assert isinstance(model, FIDInception) and not model.training
    for (k, a), b in zip(inception.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), k
    assert model.weights_sha256 and len(model.weights_sha256) == 64
    assert model.standard_weights is False  # random weights do not carry the standard file's hash


def test_load_accepts_wrapper_naming_and_missing_optional_keys(tmp_path, inception):
    """pytorch-fid's InceptionV3 wrapper saves blocks.* keys without fc; old files may lack
    num_batches_tracked. Both load into the same weights."""
    wrapper_rows = _keylist("inceptionv3_wrapper.tsv")
    state = inception.state_dict()
    file_keys = [k for k in state if not k.startswith("fc.")]
    assert len(wrapper_rows) == len(file_keys) == 564
    wrapper_state = {w[0]: state[f] for w, f in zip(wrapper_rows, file_keys)}
    path = tmp_path / "wrapper.pth"
    torch.save(wrapper_state, path)
    loaded = load_inception(path)
    for k in file_keys:
        assert torch.equal(loaded.state_dict()[k], state[k]), k

    no_nbt = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    torch.save(no_nbt, tmp_path / "old.pth")
    assert torch.equal(load_inception(tmp_path / "old.pth").Mixed_7c.branch_pool.conv.weight,
                       state["Mixed_7c.branch_pool.conv.weight"])


def test_wrong_files_are_refused_clearly(tmp_path, inception):
    missing = tmp_path / "nope.pth"
    with pytest.raises(CheckpointError, match="not found.*nope.pth"):
        load_inception(missing)

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a torch file")
    with pytest.raises(CheckpointError, match="garbage.pth: not a PyTorch file"):
        load_inception(garbage)

    # A different network's weights (an IR-101-like dict) is named as such, with examples.
    other = tmp_path / "other.pth"
    torch.save({"input_layer.0.weight": torch.zeros(64, 3, 3, 3), "body.0.res_layer.1.weight": torch.zeros(64)}, other)
    with pytest.raises(CheckpointError, match=r"other.pth is not the FID Inception weights.*missing key"):
        load_inception(other)

    state = inception.state_dict()
    state["Mixed_5b.branch1x1.conv.weight"] = torch.zeros(64, 191, 1, 1)
    bad_shape = tmp_path / "bad_shape.pth"
    torch.save(state, bad_shape)
    with pytest.raises(CheckpointError, match=r"shape mismatch.*Mixed_5b.branch1x1.conv.weight"):
        load_inception(bad_shape)

    state = dict(inception.state_dict())
    state["Conv2d_1a_3x3.conv.weight"] = torch.full_like(state["Conv2d_1a_3x3.conv.weight"], float("nan"))
    nan_file = tmp_path / "nan.pth"
    torch.save(state, nan_file)
    with pytest.raises(CheckpointError, match="non-finite.*Conv2d_1a_3x3"):
        load_inception(nan_file)
