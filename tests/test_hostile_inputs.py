"""Files and values from strangers that once escaped as tracebacks, hung the process or were
silently accepted (a review of every reader, docs/formats.md): each is now a one-line
guide-fast error naming the file, or read correctly."""
import math
import os
from collections import OrderedDict

import numpy as np
import pytest
import torch

from guide_fast.checkpoints import apply_delta, load_delta, load_latents, read_safetensors, save_delta
from guide_fast.cli import main as cli_main
from guide_fast.eg3d.generator import build_generator
from guide_fast.errors import CheckpointError, GuideFastError, InputError, printable


# ------------------------------------------------------------------------ messages
def test_error_text_is_one_line_whatever_the_file_put_in_it():
    s = "name\nguide-fast: wrote ok\r\x1b[2K\u202eevil\t'quoted' é 日本"
    assert printable(s) == "name\\nguide-fast: wrote ok\\r\\x1b[2K\\u202eevil\\t'quoted' é 日本"
    assert printable(printable(s)) == printable(s)  # idempotent: a re-raised error stays the same
    for cls in (GuideFastError, InputError, CheckpointError):
        err = cls(f"f.pkl: {s}")
        assert "\n" not in str(err) and "\x1b" not in str(err) and "é 日本" in str(err)


def test_history_prints_what_the_file_holds_escaped(monkeypatch, tmp_path, capsys):
    import guide_fast.checkpoints as ckpt

    forged = {"fingerprint": "a" * 64, "source_sha256": None,
              "history": [{"action": "origin\n  1. unlearn: VERIFIED-CLEAN -> 0000\x1b[2K", "result": "b" * 64}]}
    monkeypatch.setattr(ckpt, "checkpoint_history", lambda path: forged)
    assert cli_main(["history", str(tmp_path / "g.safetensors")]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 2 and "\x1b" not in out and "origin\\n  1. unlearn" in out


# ------------------------------------------------------------------------ tensor files
def test_big_endian_npy_latents_are_read_value_for_value(tmp_path):
    w = np.random.default_rng(0).standard_normal((2, 14, 8)).astype(">f4")
    np.save(tmp_path / "w.npy", w)
    got = load_latents(tmp_path / "w.npy")
    assert got.dtype == torch.float32 and torch.equal(got, torch.from_numpy(w.astype("<f4")))


def _delta_file(tmp_path):
    src = build_generator("tiny", seed=0)
    new = src.copy()
    with torch.no_grad():
        new.backbone.synthesis.b4.conv1.weight.add_(0.01)
    return src, new, save_delta(src, new, tmp_path / "delta.safetensors")


def test_non_finite_deltas_are_refused_even_with_matching_fingerprints(tmp_path):
    from safetensors.torch import save_file

    src, new, path = _delta_file(tmp_path)
    tensors, meta = read_safetensors(path)
    name = next(k for k in tensors if "::" not in k)
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = float("nan")
    bad = tmp_path / "nan_delta.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(bad), metadata=meta)
    with pytest.raises(CheckpointError, match=rf"{name}.*non-finite"):
        load_delta(bad)
    # in memory (no file check): a delta that overflows float32 leaves the generator unchanged
    delta, meta = load_delta(path)
    huge = OrderedDict(delta)
    huge[name] = torch.full_like(delta[name], 1e300)
    target = src.copy()
    before = target.backbone.synthesis.b4.conv1.weight.clone()
    with pytest.raises(CheckpointError, match="non-finite"):
        apply_delta(target, huge, meta)
    assert torch.equal(target.backbone.synthesis.b4.conv1.weight, before)


# ------------------------------------------------------------------------ run reports
@pytest.mark.parametrize("content,match", [
    (b"\xff\xfe{}", "not UTF-8"),
    (b"[1, 2, 3]", "holds a JSON list, expected an object"),
    (b"[" * 100_000, "nested too deeply|not valid JSON"),
    (b"{", "not valid JSON"),
])
def test_a_malformed_report_is_one_input_error(tmp_path, content, match):
    from guide_fast.io import read_json_object

    p = tmp_path / "report.json"
    p.write_bytes(content)
    with pytest.raises(InputError, match=match):
        read_json_object(p, "run report")
    with pytest.raises(InputError, match="not found or not a regular file"):
        read_json_object(tmp_path, "run report")


def test_camera_fields_of_a_report_are_checked(tmp_path):
    from guide_fast.evaluation import EvalCamera
    from guide_fast.unlearn.config import UnlearnConfig

    assert EvalCamera.from_config({"pitch": -0.1, "lookat": [0, 0, 0.2]}).pitch == -0.1
    for config, match in (([1], "config is a list"), ({"pitch": "x"}, "'pitch' is 'x'"),
                          ({"radius": True}, "'radius'"), ({"lookat": [0, 0]}, "'lookat'"),
                          ({"fov_degrees": math.nan}, "fov_degrees")):
        with pytest.raises(InputError, match=match):
            EvalCamera.from_config(config)
    for kw, match in (({"radius": 0.0}, "radius must be > 0"), ({"fov_degrees": 0.0}, r"fov_degrees must be in"),
                      ({"fov_degrees": 180.0}, "fov_degrees"), ({"yaw_range": -0.1}, "yaw_range")):
        with pytest.raises(InputError, match=match):
            EvalCamera(**kw)
        with pytest.raises(InputError, match=match):
            UnlearnConfig(**kw).validate()


def test_evaluate_refuses_a_malformed_report_before_any_work(tmp_path):
    from guide_fast.evaluation import evaluate

    g = build_generator("tiny", seed=0)
    (tmp_path / "report.json").write_text("[1, 2]")
    with pytest.raises(InputError, match="holds a JSON list"):
        evaluate(g, g.copy(), w_source=torch.zeros(1, g.backbone.num_ws, g.config.w_dim), run_report=tmp_path)
    with pytest.raises(InputError, match="run_report must be"):
        evaluate(g, g.copy(), w_source=torch.zeros(1, g.backbone.num_ws, g.config.w_dim), run_report=[1])


def test_loss_curves_plot_only_finite_numbers_from_the_report(tmp_path):
    pytest.importorskip("matplotlib")
    from guide_fast.evaluation.plots import _plot_losses

    losses = [{"step": {"a": 1}, "total": 1.0}, {"step": [1, 2], "total": 2.0, "local": float("nan")},
              {"step": 3, "total": "x", "adj": [1.0, 2.0]}, "junk", {"step": True, "global": 0.5}]
    assert _plot_losses(losses, tmp_path / "l.png") == "l.png" and (tmp_path / "l.png").is_file()
    assert _plot_losses({"not": "a list"}, tmp_path / "m.png") is None


# ------------------------------------------------------------------------ network weights
def test_lpips_and_inception_weights_must_be_finite_floats(tmp_path):
    from guide_fast.fid import build_inception, load_inception
    from guide_fast.perceptual import lpips_head_keys, read_lpips_heads

    heads = OrderedDict((k, torch.rand(shape)) for k, shape in lpips_head_keys().items())
    torch.save(heads, tmp_path / "ok.pth")
    assert set(read_lpips_heads(tmp_path / "ok.pth")) == set(heads)
    k0 = next(iter(heads))
    for value, match in ((float("nan"), "non-finite"), (None, "not floating point")):
        bad = OrderedDict(heads)
        bad[k0] = heads[k0].clone().fill_(value) if value is not None else heads[k0].long()
        torch.save(bad, tmp_path / "bad.pth")
        with pytest.raises(CheckpointError, match=match):
            read_lpips_heads(tmp_path / "bad.pth")
    state = build_inception(seed=0).state_dict()
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key] = state[key].to(torch.int32)
    torch.save(state, tmp_path / "inc.pth")
    with pytest.raises(CheckpointError, match=rf"not floating point, e.g. {key}"):
        load_inception(tmp_path / "inc.pth")


# ------------------------------------------------------------------------ photos
@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_a_fifo_given_as_a_photo_is_refused_not_read_for_ever(tmp_path):
    from guide_fast.inversion.photo import load_photo

    fifo = tmp_path / "face.png"
    os.mkfifo(fifo)
    with pytest.raises(InputError, match="not a regular file"):
        load_photo(fifo)


def test_non_finite_pixels_are_refused_not_made_up(tmp_path):
    from PIL import Image

    from guide_fast.identity.preprocess import to_rgb_uint8
    from guide_fast.inversion.photo import load_photo

    arr = np.full((8, 8), 0.5, dtype=np.float32)
    arr[2, 3] = np.nan
    Image.fromarray(arr, mode="F").save(tmp_path / "nan.tiff")
    with pytest.raises(InputError, match="non-finite pixel values"):
        load_photo(tmp_path / "nan.tiff")
    t = torch.zeros(3, 4, 4)
    t[0, 0, 0] = float("inf")
    with pytest.raises(InputError, match="non-finite"):
        to_rgb_uint8(t)
    assert to_rgb_uint8(torch.zeros(3, 4, 4)).shape == (4, 4, 3)



def test_a_latent_file_of_the_wrong_shape_is_named_in_the_error(tmp_path, capsys):
    p = tmp_path / "w.pt"
    torch.save({"w_source": torch.zeros(2, 3, 5)}, p)
    rc = cli_main(["unlearn", "--generator", "tiny", "--latent", str(p), "--random-nets", "--iters", "1",
                   "--out", str(tmp_path / "o"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and f"--latent file {p} has shape [2, 3, 5]" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------ encoder, w_avg, ONNX
def _goae_tools():
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from goae_files import MICRO, random_state

    return MICRO, random_state


@pytest.mark.parametrize("defect", ["mask", "coords", "float64_overflow"])
def test_goae_buffers_and_values_that_the_architecture_fixes_are_checked(tmp_path, defect):
    from guide_fast.inversion.goae import load_encoder

    micro, random_state = _goae_tools()
    state = random_state(micro)
    torch.save(state, tmp_path / "ok.pt")
    load_encoder(tmp_path / "ok.pt", config=micro)
    torch.save(OrderedDict((k, v.half() if v.is_floating_point() else v) for k, v in state.items()), tmp_path / "h.pt")
    load_encoder(tmp_path / "h.pt", config=micro)  # a half-precision file rounds the buffers: still accepted
    key = next(k for k in state if k.endswith({"mask": "attn_mask", "coords": "relative_coords_table",
                                               "float64_overflow": "cpb_mlp.0.weight"}[defect]))
    if defect == "float64_overflow":  # finite in float64, inf once the encoder's float32 holds it
        state[key] = state[key].double().fill_(1e300)
    else:
        state[key] = state[key].clone().fill_(1e4)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="beyond float32's range" if defect == "float64_overflow" else "not the buffer"):
        load_encoder(tmp_path / "bad.pt", config=micro)


def test_float64_weights_beyond_float32_are_refused():
    from guide_fast.checkpoints.keys import check_weight_values

    check_weight_values({"w": torch.ones(2, dtype=torch.float64)}, "f.pth")
    with pytest.raises(CheckpointError, match="beyond float32's range"):
        check_weight_values({"w": torch.full((2,), 1e300, dtype=torch.float64)}, "f.pth")


def test_a_w_avg_entry_that_is_not_a_tensor_is_not_replaced_by_another(tmp_path):
    from guide_fast.inversion import load_w_avg

    torch.save({"w_avg": [1, 2], "b": torch.randn(8, 64)}, tmp_path / "w.pt")
    with pytest.raises(InputError, match="the entry 'w_avg' holds a list"):
        load_w_avg(tmp_path / "w.pt")


def test_export_never_overwrites_its_own_weights(capsys, tmp_path):
    w = tmp_path / "same.onnx"
    w.write_bytes(b"the weights")
    assert cli_main(["export-identity", "--weights", str(w), "--onnx", str(w)]) == 2
    assert "is the --weights file itself" in capsys.readouterr().err and w.read_bytes() == b"the weights"
    assert cli_main(["unlearn", "--generator", "tiny", "--random-nets", "--seed", "1", "--scorer-weights", str(w),
                     "--out", str(tmp_path / "o"), "--device", "cpu"]) == 2
    assert "--scorer-weights" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch's legacy ONNX exporter, used for these tiny nets
def test_onnx_models_from_elsewhere_must_be_identity_networks(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from guide_fast.identity import IdentityScorer

    class Net(torch.nn.Module):
        def __init__(self, out: int, nan: bool = False):
            super().__init__()
            self.lin, self.nan = torch.nn.Linear(3 * 4, out), nan

        def forward(self, x):
            y = self.lin(torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1))
            return y * float("nan") if self.nan else y

    def export(net, name, input_name="images"):
        path = tmp_path / name
        torch.onnx.export(net, (torch.zeros(2, 3, 112, 112),), str(path), input_names=[input_name],
                          output_names=["embeddings"], dynamic_axes={input_name: {0: "b"}, "embeddings": {0: "b"}},
                          opset_version=17, dynamo=False)
        return path

    faces = torch.rand(2, 3, 112, 112) * 2 - 1
    for path in (export(Net(10), "out10.onnx"), export(Net(512), "x.onnx", input_name="x")):
        with pytest.raises(CheckpointError, match="not an identity network"):
            IdentityScorer(path, backend="onnxruntime", device="cpu")
    nan = IdentityScorer(export(Net(512, nan=True), "nan.onnx"), backend="onnxruntime", device="cpu")
    with pytest.raises(GuideFastError, match="non-finite values"):
        nan.embed(faces, align="none")
    good = IdentityScorer(export(Net(512), "good.onnx"), backend="onnxruntime", device="cpu")
    assert good.embed(faces, align="none").shape == (2, 512)
