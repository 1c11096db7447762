"""The weight manifest and `guide-fast weights` / `guide-fast export-identity`, on random-weight
files written in the official formats."""
import json
import os
import sys

import numpy as np
import pytest
import torch

from guide_fast import weights as W
from guide_fast.cli import main as cli_main
from guide_fast.identity import IdentityScorer, build_backbone
from guide_fast.perceptual import LPIPS, lpips_head_keys, vgg16_feature_keys

sys.path.insert(0, os.path.dirname(__file__))
from goae_files import MICRO, random_state, use_micro_in_manifest  # noqa: E402


def _inception_state():
    try:
        from guide_fast.fid import build_inception

        return build_inception(seed=0).state_dict()
    except ImportError:
        from torchvision.models.inception import Inception3

        torch.manual_seed(0)
        return Inception3(num_classes=1008, aux_logits=False, init_weights=False).state_dict()


def _eg3d_pickle_bytes():
    try:
        from official_pickle import official_pickle_bytes

        from guide_fast.eg3d.generator import build_generator
    except ImportError:
        return None
    return official_pickle_bytes(build_generator("tiny", seed=0))


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory):
    """Every manifest file, with random values, in its official format."""
    d = tmp_path_factory.mktemp("weights")
    torch.save(build_backbone("ir_se50", seed=1).state_dict(), d / "model_ir_se50.pth")
    # An old-format file without num_batches_tracked (docs/face_models.md §0) is still valid.
    ir101 = {k: v for k, v in build_backbone("ir101", seed=2).state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(ir101, d / "CurricularFace_Backbone.pth")
    lp = LPIPS.random(0).state_dict()
    vgg = {}
    for key in vgg16_feature_keys():
        _, idx, name = key.split(".")
        vgg[key] = next(v for k, v in lp.items() if k.endswith(f".{idx}.{name}") and k.startswith("net."))
    torch.save(vgg, d / "vgg16-397923af.pth")
    torch.save({k: torch.rand(s) for k, s in lpips_head_keys().items()}, d / "vgg.pth")
    torch.save(_inception_state(), d / "pt_inception-2015-12-05-6726825d.pth")
    torch.save(random_state(MICRO, seed=5), d / "encoder_FFHQ.pt")  # checked against MICRO in test_all_valid
    torch.save(torch.randn(14, 512), d / "w_avg_ffhqrebalanced512-128.pt")
    np.save(d / "ffhq_real_feat.npy", np.random.default_rng(0).standard_normal((4, 2048)).astype(np.float32))
    eg3d = _eg3d_pickle_bytes()
    if eg3d is not None:
        (d / "ffhqrebalanced512-128.pkl").write_bytes(eg3d)
    return d


def _by_name(statuses):
    return {s.name: s for s in statuses}


def test_manifest_lists_every_external_file():
    assert list(W.MANIFEST) == ["eg3d", "ir_se50", "ir101", "vgg16", "lpips_heads", "fid_inception", "goae",
                                "w_avg", "ffhq_real_features"]
    for e in W.MANIFEST.values():
        assert e.filenames and e.format and e.source and callable(e.validator)
    assert W.MANIFEST["goae"].optional and not W.MANIFEST["ir101"].optional


def test_all_valid(weights_dir, monkeypatch):
    use_micro_in_manifest(monkeypatch)  # the official GOAE layout is a 445 MiB file
    st = _by_name(W.check_dir(weights_dir, use_fallbacks=False))
    for name in ["ir_se50", "ir101", "vgg16", "lpips_heads", "fid_inception", "goae", "w_avg", "ffhq_real_features"]:
        assert st[name].status == "valid", (name, st[name].detail)
    assert "no num_batches_tracked" in st["ir101"].detail
    assert "no classifier" in st["vgg16"].detail
    if (weights_dir / "ffhqrebalanced512-128.pkl").exists():
        assert st["eg3d"].status == "valid", st["eg3d"].detail
    else:
        assert st["eg3d"].status == "missing"


def test_invalid_and_missing(weights_dir, tmp_path):
    d = tmp_path
    # Right name, wrong network: an IR-101 file where IR-SE50 is expected (hard links: no copies).
    os.link(weights_dir / "CurricularFace_Backbone.pth", d / "model_ir_se50.pth")
    os.link(weights_dir / "model_ir_se50.pth", d / "pt_inception-2015-12-05-6726825d.pth")
    vgg = torch.load(weights_dir / "vgg16-397923af.pth", weights_only=True)
    vgg["features.0.weight"] = torch.zeros(64, 3, 5, 5)
    torch.save(vgg, d / "vgg16-397923af.pth")
    nan_heads = {k: torch.full(s, float("nan")) for k, s in lpips_head_keys().items()}
    torch.save(nan_heads, d / "vgg.pth")
    (d / "ffhqrebalanced512-128.pkl").write_bytes(b"\x80\x04not really a pickle")
    (d / "encoder_FFHQ.pt").write_text("hello")
    torch.save(torch.zeros(3, 3), d / "w_avg_ffhqrebalanced512-128.pt")
    st = _by_name(W.check_dir(d, use_fallbacks=False))
    assert st["ir_se50"].status == "invalid" and "holds IR-101" in st["ir_se50"].detail
    assert st["ir101"].status == "missing" and "CurricularFace_Backbone.pth not in" in st["ir101"].detail
    assert st["vgg16"].status == "invalid" and "shape mismatch features.0.weight" in st["vgg16"].detail
    assert st["lpips_heads"].status == "invalid" and "non-finite" in st["lpips_heads"].detail
    assert st["fid_inception"].status == "invalid" and str(d) in st["fid_inception"].detail
    assert st["goae"].status == "invalid" and "weights_only" in st["goae"].detail
    assert st["w_avg"].status == "invalid" and "[3, 3]" in st["w_avg"].detail
    assert st["ffhq_real_features"].status == "missing"
    try:
        import guide_fast.checkpoints  # noqa: F401
        assert st["eg3d"].status == "invalid", st["eg3d"].detail
    except ImportError:
        assert st["eg3d"].status == "found" and "not validated" in st["eg3d"].detail
    # Fallbacks: lpips ships its own vgg.pth, used when the folder has none.
    os.unlink(d / "vgg.pth")
    heads = _by_name(W.check_dir(d))["lpips_heads"]
    try:
        import lpips  # noqa: F401
        assert heads.status == "valid" and "not in" in heads.detail and "lpips" in str(heads.path)
    except ImportError:
        assert heads.status == "missing"


def test_weights_command_reports_and_exits_one_on_an_invalid_file(weights_dir, tmp_path, capsys, monkeypatch):
    (tmp_path / "model_ir_se50.pth").write_bytes(b"garbage")
    out_json = tmp_path / "report.json"
    assert cli_main(["weights", "--dir", str(tmp_path), "--no-fallbacks", "--json", str(out_json)]) == 1
    captured = capsys.readouterr()
    assert captured.err.strip() == "guide-fast weights: 1 invalid file: ir_se50 (see above)"
    text = captured.out
    assert "ir_se50" in text and "invalid" in text and "missing" in text and "summary:" in text
    assert "https://download.pytorch.org/models/vgg16-397923af.pth" in text  # where a missing file comes from
    report = json.loads(out_json.read_text())
    statuses = {f["name"]: f["status"] for f in report["files"]}
    assert statuses["ir_se50"] == "invalid" and statuses["ir101"] == "missing"
    use_micro_in_manifest(monkeypatch)  # weights_dir's GOAE file has the MICRO layout
    assert cli_main(["weights", "--dir", str(weights_dir), "--no-fallbacks"]) == 0
    assert "ir101               valid" in capsys.readouterr().out
    assert cli_main(["weights", "--dir", str(tmp_path / "nope")]) == 2


def test_export_identity_command(weights_dir, tmp_path, capsys):
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    out = tmp_path / "sub" / "ir_se50.onnx"
    assert cli_main(["export-identity", "--weights", str(weights_dir / "model_ir_se50.pth"), "--onnx", str(out)]) == 0
    text = capsys.readouterr().out
    assert "IR-SE50" in text and "batch 1:" in text and "batch 7:" in text
    assert out.is_file() and [p.name for p in out.parent.iterdir()] == ["ir_se50.onnx"]  # no temporaries left
    # The exported file scores like the torch model.
    torch_scorer = IdentityScorer(weights_dir / "model_ir_se50.pth", backend="torch", device="cpu")
    ort_scorer = IdentityScorer(out, backend="onnxruntime", device="cpu")
    x = torch.rand(3, 3, 112, 112) * 2 - 1
    cos = torch.nn.functional.cosine_similarity(torch_scorer.embed(x, aligned=True), ort_scorer.embed(x, aligned=True))
    assert float(cos.min()) >= 0.99999
    # Errors: a wrong weight file writes nothing; --tensorrt without TensorRT fails before exporting.
    bad_out = tmp_path / "bad.onnx"
    assert cli_main(["export-identity", "--weights", str(weights_dir / "vgg.pth"), "--onnx", str(bad_out)]) == 2
    assert "not an IR-SE50" in capsys.readouterr().err and not bad_out.exists()
    from guide_fast.identity.tensorrt_backend import tensorrt_status

    if not tensorrt_status()[0]:
        assert cli_main(["export-identity", "--weights", str(weights_dir / "model_ir_se50.pth"),
                         "--onnx", str(bad_out), "--tensorrt", str(tmp_path / "x.plan")]) == 2
        assert "TensorRT backend unavailable" in capsys.readouterr().err and not bad_out.exists()
