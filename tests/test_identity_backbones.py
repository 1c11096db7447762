"""IR-SE50 / IR-101: official key names, shapes and order; loading random files saved under
those names; refusing wrong files; the ID loss (docs/face_models.md §1-2, §1.4)."""
import hashlib

import pytest
import torch
import torch.nn.functional as F

from guide_fast.errors import CheckpointError, InputError
from guide_fast.identity import IdentityLoss, build_backbone, expected_keys, idloss_crop, load_backbone
from guide_fast.identity.backbones import compare_keys

from reference_data import KEYLISTS  # noqa: E402


# sha256 of "key<TAB>shape" lines of the reference key lists (keylists/README.txt format), so the
# check also runs where the reference folder is not available.
KEYLIST_SHA256 = {
    "ir_se50.tsv": "3a4a0d7e6e4089658eec4fda8069f5a59b1d1e79a567ddce4e277388c5ba510f",
    "ir101.tsv": "997fac98e626eec3968db2273b651bcc2cb664161ea7b4f59d1e802f12af1d23",
}


def _fmt(shape):
    return "x".join(str(s) for s in shape) if shape else "scalar"


def keylist_digest(table) -> str:
    return hashlib.sha256("\n".join(f"{k}\t{_fmt(s)}" for k, s in table.items()).encode()).hexdigest()


@pytest.mark.parametrize("kind,tsv,entries", [("ir_se50", "ir_se50.tsv", 397), ("ir101", "ir101.tsv", 672)])
def test_state_dict_matches_official_key_list(kind, tsv, entries):
    table = expected_keys(kind)
    assert len(table) == entries
    # Same names, same shapes, same order (output_layer before body, §1.3).
    assert keylist_digest(table) == KEYLIST_SHA256[tsv]
    path = KEYLISTS / tsv
    if path.is_file():
        rows = [line.split("\t") for line in path.read_text().splitlines()]
        assert [(r[0], r[1]) for r in rows] == [(k, _fmt(s)) for k, s in table.items()]
        params = {k for k, _ in build_backbone(kind).named_parameters()}
        assert {r[0] for r in rows if r[2] == "param"} == params
    model = build_backbone(kind)
    counts = {"ir_se50": 43_797_696, "ir101": 65_128_768}
    assert sum(p.numel() for p in model.parameters()) == counts[kind]


def test_ir101_has_no_affine_final_batchnorm_and_no_se():
    table = expected_keys("ir101")
    assert "output_layer.4.weight" not in table and "output_layer.4.running_mean" in table
    assert not any(".res_layer.5." in k for k in table)
    assert "output_layer.4.weight" in expected_keys("ir_se50")


@pytest.fixture(scope="module")
def ir_se50_file(tmp_path_factory):
    model = build_backbone("ir_se50", seed=3)
    path = tmp_path_factory.mktemp("w") / "model_ir_se50.pth"
    torch.save(model.state_dict(), path)
    return model, path


def test_load_ir_se50_detects_kind_and_reproduces_outputs(ir_se50_file):
    model, path = ir_se50_file
    loaded = load_backbone(path)
    assert loaded.kind == "ir_se50" and not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    x = torch.rand(2, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        a, b = model(x), loaded(x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a.norm(dim=1), torch.ones(2), rtol=0, atol=1e-5)
    # Two different faces must not collapse onto one embedding (a sanity check of the random net).
    assert float((a[0] * a[1]).sum()) < 0.999


def test_load_ir101_without_num_batches_tracked_and_with_module_prefix(tmp_path):
    model = build_backbone("ir101", seed=5)
    state = {f"module.{k}": v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert len(state) == 568
    path = tmp_path / "CurricularFace_Backbone.pth"
    torch.save(state, path)
    loaded = load_backbone(path)
    assert loaded.kind == "ir101"
    x = torch.rand(1, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(model(x), loaded(x), rtol=0, atol=0)
    with pytest.raises(CheckpointError, match=r"holds IR-101.*expected IR-SE50"):
        load_backbone(path, kind="ir_se50")


def test_wrong_file_is_refused_with_first_differences(tmp_path, ir_se50_file):
    model, _ = ir_se50_file
    state = dict(model.state_dict())
    state["body.0.res_layer.1.weight"] = torch.zeros(64, 64, 5, 5)  # shape mismatch
    del state["output_layer.3.bias"]  # missing
    state["head.weight"] = torch.zeros(10)  # unexpected
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as err:
        load_backbone(path)
    msg = str(err.value)
    assert str(path) in msg and "Closest is IR-SE50" in msg
    assert "missing output_layer.3.bias (expected [512])" in msg
    assert "shape mismatch body.0.res_layer.1.weight: file [64, 64, 5, 5], expected [64, 64, 3, 3]" in msg
    assert "unexpected head.weight [10]" in msg


def test_non_state_dict_files_are_refused(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file at all")
    with pytest.raises(CheckpointError, match="weights_only"):
        load_backbone(junk)
    with pytest.raises(CheckpointError, match="no such file"):
        load_backbone(tmp_path / "absent.pth")
    # A pickle that would run code is refused by weights_only=True (nothing is executed).
    evil = tmp_path / "evil.pth"
    torch.save({"x": torch.zeros(1), "obj": _Evil()}, evil)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_backbone(evil)
    vgg_like = tmp_path / "vgg.pth"
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, vgg_like)
    with pytest.raises(CheckpointError, match="not an IR-SE50"):
        load_backbone(vgg_like)


class _Evil:
    def __reduce__(self):
        return (print, ("executed!",))


def test_compare_keys_treats_num_batches_tracked_as_optional():
    table = expected_keys("ir_se50")
    state = {k: torch.empty(s) for k, s in table.items() if not k.endswith("num_batches_tracked")}
    assert compare_keys(state, table) == []


# ------------------------------------------------------------------------------ ID loss (§1.4)

@pytest.fixture(scope="module")
def id_loss(ir_se50_file):
    return IdentityLoss(ir_se50_file[0])


def test_idloss_crop_is_resize_crop_pool():
    x = torch.rand(2, 3, 512, 512) * 2 - 1
    ref = F.interpolate(x, size=(256, 256), mode="bilinear", align_corners=False)[:, :, 35:223, 32:220]
    ref = torch.nn.AdaptiveAvgPool2d((112, 112))(ref)
    torch.testing.assert_close(idloss_crop(x), ref, rtol=0, atol=0)
    # At 512 the bilinear resize is exactly 2x2 mean pooling (docs/face_models.md §1.4 step 1).
    torch.testing.assert_close(F.interpolate(x, size=(256, 256), mode="bilinear", align_corners=False),
                               F.avg_pool2d(x, 2), rtol=0, atol=1e-6)
    assert idloss_crop(torch.zeros(1, 3, 64, 64)).shape == (1, 3, 112, 112)
    with pytest.raises(InputError):
        idloss_crop(torch.zeros(3, 64, 64))


def test_identity_loss_values_gradients_and_frozen_backbone(id_loss):
    torch.manual_seed(0)
    a = (torch.rand(2, 3, 64, 64) * 2 - 1).requires_grad_(True)  # the tiny generator's size
    t = (torch.rand(2, 3, 64, 64) * 2 - 1).requires_grad_(True)
    per = id_loss(a, t, reduction="none")
    assert per.shape == (2,)
    ea, et = id_loss.embed(a), id_loss.embed(t)
    torch.testing.assert_close(per, 1 - (ea * et).sum(1), rtol=0, atol=1e-6)
    torch.testing.assert_close(id_loss(a, t), per.mean())
    id_loss(a, t).backward()
    assert a.grad is not None and a.grad.abs().sum() > 0
    assert t.grad is None  # the target branch is detached (§1.4)
    assert all(p.grad is None and not p.requires_grad for p in id_loss.backbone.parameters())
    assert float(id_loss(a.detach(), a.detach())) == pytest.approx(0.0, abs=1e-6)
    id_loss.train()
    assert id_loss.training and not id_loss.backbone.training
    with pytest.raises(InputError):
        id_loss(a, t[:1])
    with pytest.raises(InputError):
        id_loss(a, t, reduction="sum")


@pytest.mark.parametrize("defect", ["nan", "int64"])
def test_right_names_and_shapes_with_bad_values_are_refused(tmp_path, ir_se50_file, defect):
    """NaN weights made NaN embeddings (every similarity null, no error); integer weights failed
    halfway through load_state_dict with a raw RuntimeError."""
    model, _ = ir_se50_file
    state = dict(model.state_dict())
    key = "body.0.res_layer.1.weight"
    state[key] = state[key].clone().fill_(float("nan")) if defect == "nan" else state[key].long()
    path = tmp_path / f"{defect}.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="non-finite" if defect == "nan" else "not floating point") as err:
        load_backbone(path)
    assert str(path) in str(err.value) and key in str(err.value)
