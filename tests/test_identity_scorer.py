"""IdentityScorer: torch / ONNX Runtime / TensorRT backends, preprocessing modes, missing faces.

ONNX Runtime must reproduce torch (cosine >= 0.99999) at batch 1 and 7 (issue 4). TensorRT
tests run only where TensorRT and CUDA exist; GPU tests only with CUDA.
"""
import numpy as np
import pytest
import torch

from guide_fast.errors import GuideFastError, InputError
from guide_fast.identity import IdentityScorer, NoFaceError, build_backbone, idloss_crop, normalize_uint8
from guide_fast.identity.tensorrt_backend import BackendUnavailableError, engine_cache_key, tensorrt_status

onnx = pytest.importorskip("onnx", reason="onnx is not installed")
pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")

TRT_OK, TRT_REASON = tensorrt_status()
MIN_COS = 0.99999


@pytest.fixture(scope="module")
def backbone():
    return build_backbone("ir_se50", seed=11)


@pytest.fixture(scope="module")
def torch_scorer(backbone):
    return IdentityScorer(backbone, backend="torch", device="cpu", batch_size=4)


@pytest.fixture(scope="module")
def ort_scorer(backbone, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "ir_se50.onnx"
    return IdentityScorer(backbone, backend="onnxruntime", device="cpu", batch_size=4, onnx_path=path)


def _faces(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 112, 112, generator=g) * 2 - 1


@pytest.mark.parametrize("batch", [1, 7])
def test_onnxruntime_matches_torch(torch_scorer, ort_scorer, backbone, batch):
    x = _faces(batch, seed=batch)
    a = torch_scorer.embed(x, align="none")
    b = ort_scorer.embed(x, align="none")
    assert a.shape == b.shape == (batch, 512)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=1)
    assert float(cos.min()) >= MIN_COS, cos
    with torch.no_grad():  # batching (batch_size=4 splits 7 into 4 + 3) changes nothing
        torch.testing.assert_close(a, backbone(x), rtol=0, atol=1e-5)
    torch.testing.assert_close(b.norm(dim=1), torch.ones(batch), rtol=0, atol=1e-5)


def test_exported_model_is_valid_onnx_with_dynamic_batch(ort_scorer):
    from guide_fast.identity.onnx_export import METADATA_KIND, onnx_metadata

    model = onnx.load(str(ort_scorer.onnx_path))
    onnx.checker.check_model(model)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert model.graph.input[0].name == "images" and dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 112, 112]
    assert model.graph.output[0].name == "embeddings"
    assert onnx_metadata(ort_scorer.onnx_path)[METADATA_KIND] == "ir_se50"
    # An existing .onnx file is a valid scorer input by itself.
    again = IdentityScorer(ort_scorer.onnx_path, backend="onnxruntime", device="cpu")
    assert again.kind == "ir_se50"
    x = _faces(2, seed=5)
    torch.testing.assert_close(again.embed(x, align="none"), ort_scorer.embed(x, align="none"), rtol=0, atol=0)
    with pytest.raises(InputError, match="ONNX file needs backend"):
        IdentityScorer(ort_scorer.onnx_path, backend="torch")


def test_dynamo_exporter_also_matches(backbone, tmp_path):
    pytest.importorskip("onnxscript", reason="the dynamo ONNX exporter needs onnxscript")
    from guide_fast.identity.onnx_export import compare_with_torch, export_onnx

    path = export_onnx(backbone, tmp_path / "d.onnx", exporter="dynamo")
    assert not list(tmp_path.glob("*.data"))  # one self-contained file
    report = compare_with_torch(backbone, path, batch_sizes=(3,))
    assert report["min_cosine"] >= MIN_COS


def test_idloss_mode_equals_crop_then_network(torch_scorer, backbone):
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        expect = backbone(idloss_crop(x))
    got = torch_scorer.embed(x, align="idloss")
    torch.testing.assert_close(got, expect, rtol=0, atol=1e-5)
    torch.testing.assert_close((got * got).sum(1), torch.ones(1), rtol=0, atol=1e-5)
    # uint8 inputs go through x / 127.5 - 1 first
    u8 = np.random.default_rng(0).integers(0, 256, size=(1, 112, 112, 3), dtype=np.uint8)
    torch.testing.assert_close(torch_scorer.embed(u8, aligned=True), torch_scorer.embed(normalize_uint8(u8), align="none"))
    with pytest.raises(InputError, match="align='none' expects aligned 112x112"):
        torch_scorer.embed(x, align="none")
    with pytest.raises(InputError, match="align must be one of"):
        torch_scorer.embed(x, align="center")


def test_bf16_precision_path_on_cpu(backbone):
    fast = IdentityScorer(backbone, backend="torch", device="cpu", precision="bf16")
    x = _faces(1, seed=9)
    with torch.no_grad():
        ref = backbone(x)
    cos = torch.nn.functional.cosine_similarity(fast.embed(x, align="none"), ref, dim=1)
    assert float(cos.min()) > 0.99
    assert next(backbone.parameters()).dtype == torch.float32  # the caller's module is untouched


def test_tensorrt_absent_is_reported_clearly(backbone):
    if TRT_OK:
        pytest.skip("TensorRT and CUDA are available here; the real backend is tested instead")
    with pytest.raises(BackendUnavailableError) as err:
        IdentityScorer(backbone, backend="tensorrt")
    msg = str(err.value)
    ok_module = True
    try:
        import tensorrt  # noqa: F401
    except Exception:  # noqa: BLE001
        ok_module = False
    if not ok_module:
        assert "`tensorrt` Python module" in msg
    if not torch.cuda.is_available():
        assert "CUDA" in msg
    assert isinstance(err.value, GuideFastError)


def test_engine_cache_key_names_model_version_and_gpu():
    key = engine_cache_key("ab" * 32, "10.3.0", "NVIDIA H100 80GB HBM3", 64)
    assert key == "identity-abababababababab-trt10.3.0-nvidia-h100-80gb-hbm3-b64-fp16"
    assert engine_cache_key("cd" * 32, "10.3.0", "NVIDIA H100 80GB HBM3", 64) != key


@pytest.mark.skipif(not TRT_OK, reason=TRT_REASON or "TensorRT unavailable")
def test_tensorrt_backend_matches_torch(backbone, tmp_path):
    cache = tmp_path / "engines"
    trt_scorer = IdentityScorer(backbone, backend="tensorrt", batch_size=8, cache_dir=cache, onnx_path=tmp_path / "m.onnx")
    plans = list(cache.glob("*.plan"))
    assert len(plans) == 1 and torch.cuda.get_device_name().split()[-1].lower() in plans[0].name
    x = _faces(7, seed=3)
    with torch.no_grad():
        ref = backbone(x)
    cos = torch.nn.functional.cosine_similarity(trt_scorer.embed(x, align="none"), ref, dim=1)
    assert float(cos.min()) > 0.999  # fp16 engine
    mtime = plans[0].stat().st_mtime_ns
    IdentityScorer(backbone, backend="tensorrt", batch_size=8, cache_dir=cache, onnx_path=tmp_path / "m.onnx")
    assert plans[0].stat().st_mtime_ns == mtime  # reused from the cache


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_graph_matches_eager_and_fp32(backbone):
    gpu = IdentityScorer(backbone, backend="torch", device="cuda", batch_size=8)
    assert gpu._runner.use_graph and gpu._runner.precision == "bf16"
    eager = IdentityScorer(backbone, backend="torch", device="cuda", batch_size=8, cuda_graph=False)
    x = _faces(11, seed=4)  # 8 + 3: two captured shapes
    a = gpu.embed(x, align="none")
    b = eager.embed(x, align="none")
    torch.testing.assert_close(a, b, rtol=0, atol=2e-3)  # same bf16 kernels, replayed
    assert len(gpu._runner._graphs) == 2
    a2 = gpu.embed(x.flip(0), align="none")  # replay with new inputs
    torch.testing.assert_close(a2, a.flip(0), rtol=0, atol=2e-3)
    with torch.no_grad():
        ref = backbone(x)
    cos = torch.nn.functional.cosine_similarity(a, ref, dim=1)
    assert float(cos.min()) > 0.99
    fp32 = IdentityScorer(backbone, backend="torch", device="cuda", precision="fp32", cuda_graph=True)
    cos32 = torch.nn.functional.cosine_similarity(fp32.embed(x, align="none"), ref, dim=1)
    assert float(cos32.min()) > 0.9999


# ------------------------------------------------------------------- MTCNN (evaluation) path

@pytest.fixture(scope="module")
def astronaut():
    pytest.importorskip("facenet_pytorch", reason="facenet-pytorch (MTCNN weights) is not installed")
    data = pytest.importorskip("skimage.data", reason="scikit-image (astronaut photo) is not installed")
    return data.astronaut()


def test_mtcnn_path_missing_faces_and_similarity(torch_scorer, backbone, astronaut):
    from guide_fast.identity import GUIDE_THRESHOLDS, align_face

    blank = np.full((512, 512, 3), 128, np.uint8)
    render = torch.from_numpy(astronaut).permute(2, 0, 1).float() / 127.5 - 1  # generator convention
    res = torch_scorer.embed_detailed([astronaut, blank, render])
    assert res.found.tolist() == [True, False, True] and res.num_missing == 1 and res.missing == [1]
    assert torch.isnan(res.embeddings[1]).all() and not torch.isnan(res.embeddings[[0, 2]]).any()
    # The evaluation path = align (GUIDE's thresholds, most probable face) -> x/127.5-1 -> network.
    aligned = align_face(astronaut, thresholds=GUIDE_THRESHOLDS, select="probability")
    with torch.no_grad():
        expect = backbone(aligned.tensor()[None])[0]
    torch.testing.assert_close(res.embeddings[0], expect, rtol=0, atol=1e-5)
    torch.testing.assert_close(res.embeddings[2], expect, rtol=0, atol=1e-4)  # render -> uint8 as GUIDE saves
    assert res.faces[1] is None and res.faces[0].image.shape == (112, 112, 3)
    sim = torch_scorer.similarity([astronaut, astronaut], [render, blank])
    assert float(sim[0]) == pytest.approx(1.0, abs=1e-4) and torch.isnan(sim[1])
    with pytest.raises(NoFaceError) as err:
        torch_scorer.embed([astronaut, blank], on_missing="raise")
    assert err.value.indices == [1] and "1 of 2" in str(err.value)
    tiny = astronaut[:10, :10]
    assert torch.isnan(torch_scorer.embed(tiny)).all()
