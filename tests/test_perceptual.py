"""LPIPS-VGG v0.1 (docs/face_models.md §3): parity with the lpips package on identical weights,
LPIPS(x, x) = 0, gradients, frozen parameters, loading the two weight files."""
import hashlib
import warnings

import pytest
import torch

from guide_fast.errors import CheckpointError, InputError
from guide_fast.perceptual import LPIPS, bundled_lin_path, lpips_head_keys, vgg16_feature_keys

# sha256 of the "key<TAB>shape" lines of keylists/lpips_vgg.tsv (38 rows incl. lins.* aliases).
LPIPS_KEYLIST_SHA256 = "d16f6ff3f948b2fd310d0b18763ebf56215db46b9176e6285e5a468fd666d3cc"


def _fmt(shape):
    return "x".join(str(s) for s in shape) if len(shape) else "scalar"


@pytest.fixture(scope="module")
def reference_lpips():
    lpips = pytest.importorskip("lpips", reason="the lpips package (test-only reference) is not installed")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's `pretrained=` deprecation inside lpips
        # pnet_rand=True: random VGG trunk, so nothing is downloaded; the heads come from the
        # vgg.pth inside the package.
        return lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False).eval()


def test_state_dict_names_match_lpips_package():
    ours = LPIPS.random(0).state_dict()
    # The package's state_dict has the lin{k} heads twice (lin{k}.* and lins.{k}.*, §6.5).
    table = dict((k, tuple(v.shape)) for k, v in ours.items())
    for k in range(5):
        table[f"lins.{k}.model.1.weight"] = table[f"lin{k}.model.1.weight"]
    order = [k for k in ours] + [f"lins.{k}.model.1.weight" for k in range(5)]
    text = "\n".join(f"{k}\t{_fmt(table[k])}" for k in order)
    assert hashlib.sha256(text.encode()).hexdigest() == LPIPS_KEYLIST_SHA256
    assert len(ours) == 33


def test_matches_lpips_package_on_identical_weights(reference_lpips):
    ref = reference_lpips
    ours = LPIPS.random(1)
    # package -> ours
    ours.load_state_dict({k: v for k, v in ref.state_dict().items() if not k.startswith("lins.")}, strict=True)
    torch.manual_seed(0)
    x = torch.rand(3, 3, 48, 40) * 2 - 1
    y = torch.rand(3, 3, 48, 40) * 2 - 1
    with torch.no_grad():
        expect = ref(x, y).flatten()
        got = ours(x, y)
    assert got.shape == (3,)
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-7)
    # ours -> package, with different random weights
    other = LPIPS.random(2)
    ref.load_state_dict(other.state_dict(), strict=False)
    with torch.no_grad():
        torch.testing.assert_close(other(x, y), ref(x, y).flatten(), rtol=1e-5, atol=1e-7)
        # broadcasting one reference image against a batch, as lpips allows
        torch.testing.assert_close(other(x, y[:1]), ref(x, y[:1]).flatten(), rtol=1e-5, atol=1e-7)


def test_zero_on_identical_inputs_and_gradients_to_both():
    model = LPIPS.random(3)
    torch.manual_seed(1)
    x = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_(True)
    y = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_(True)
    assert torch.equal(model(x.detach(), x.detach()), torch.zeros(2))
    d = model(x, y)
    assert bool((d > 0).all())
    d.sum().backward()
    assert x.grad is not None and y.grad is not None
    assert x.grad.abs().sum() > 0 and y.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())
    # finite differences along the gradient agree with autograd (double precision)
    m64 = LPIPS.random(3).double()
    a = torch.rand(1, 3, 16, 16, dtype=torch.float64) * 2 - 1
    b = torch.rand(1, 3, 16, 16, dtype=torch.float64) * 2 - 1
    assert torch.autograd.gradcheck(lambda u: m64(u, b), (a.requires_grad_(True),), eps=1e-6, atol=1e-5,
                                    fast_mode=True)
    model.train()
    assert not model.training
    with pytest.raises(InputError):
        model(x, y[:, :, :16])
    with pytest.raises(InputError):
        model(x[:, :1], y[:, :1])


def test_from_files_loads_vgg16_and_heads(tmp_path, reference_lpips):
    # A torchvision-format vgg16 file (features + classifier) with random values.
    src = LPIPS.random(4)
    state = {}
    for key, shape in vgg16_feature_keys().items():
        _, idx, name = key.split(".")
        s = next(i for i, (a, b) in enumerate(((0, 4), (4, 9), (9, 16), (16, 23), (23, 30)), 1) if a <= int(idx) < b)
        state[key] = src.state_dict()[f"net.slice{s}.{idx}.{name}"].clone()
        assert tuple(state[key].shape) == shape
    state["classifier.6.weight"] = torch.zeros(1000, 4096)
    state["classifier.6.bias"] = torch.zeros(1000)
    vgg_path = tmp_path / "vgg16-397923af.pth"
    torch.save(state, vgg_path)
    model = LPIPS.from_files(vgg_path, bundled_lin_path())
    # heads = the package's trained v0.1 weights (legacy CUDA-tagged file, §3.2)
    sums = [float(getattr(model, f"lin{k}").model[1].weight.sum()) for k in range(5)]
    assert sums == pytest.approx([6.93, 8.86, 17.52, 51.52, 47.03], abs=0.01)
    ref = reference_lpips
    ref.load_state_dict(model.state_dict(), strict=False)
    x, y = torch.rand(2, 2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(model(x, y), ref(x, y).flatten(), rtol=1e-5, atol=1e-7)
    # Wrong files are refused with the differences named.
    bad = dict(state)
    bad["features.0.weight"] = torch.zeros(64, 3, 5, 5)
    del bad["features.28.bias"]
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as err:
        LPIPS.from_files(tmp_path / "bad.pth", bundled_lin_path())
    assert "shape mismatch features.0.weight" in str(err.value) and "missing features.28.bias" in str(err.value)
    torch.save({k: torch.zeros(s) for k, s in lpips_head_keys().items() if not k.startswith("lin4")}, tmp_path / "h.pth")
    with pytest.raises(CheckpointError, match="missing lin4.model.1.weight"):
        LPIPS.from_files(vgg_path, tmp_path / "h.pth")
