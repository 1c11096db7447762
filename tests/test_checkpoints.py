"""Safe checkpoint loading (docs/eg3d.md §7.4), own format, convert, deltas."""
import os
import pickle
import sys

import pytest
import torch

from guide_fast import cameras
from guide_fast.checkpoints import (
    apply_delta, load_delta, load_generator, save_delta, save_generator, state_fingerprint,
)
from guide_fast.cli import main as cli_main
from guide_fast.eg3d.generator import build_generator
from guide_fast.errors import CheckpointError
from guide_fast.render import make_render_draws

sys.path.insert(0, os.path.dirname(__file__))
from official_pickle import official_pickle_bytes  # noqa: E402


def _outputs(g, seed=0):
    z = torch.randn(2, g.config.z_dim, generator=torch.Generator().manual_seed(seed))
    c = cameras.pose_label(torch.tensor([0.0, 0.2]), -0.2)
    draws = make_render_draws(2, g.neural_rendering_resolution ** 2, g.render_options, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return g.synthesis(g.mapping(z, cameras.frontal_label(2)), c, noise_mode="const", render_draws=draws)


def _assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def test_official_pickle_loads_bit_identically_without_executing_anything(tmp_path):
    g = build_generator("tiny", seed=3)
    path = tmp_path / "network-snapshot.pkl"
    path.write_bytes(official_pickle_bytes(g))
    loaded = load_generator(path)
    _assert_same_weights(g, loaded)
    assert loaded.config == g.config
    assert loaded.rendering_kwargs == g.rendering_kwargs
    assert loaded.neural_rendering_resolution == g.neural_rendering_resolution
    assert len(loaded.source_sha256) == 64
    a, b = _outputs(g), _outputs(loaded)
    for k in a:
        assert torch.equal(a[k], b[k])
    # the fake modules used while dumping are gone: the loader resolved nothing through them
    assert "torch_utils.persistence" not in sys.modules and "training.triplane" not in sys.modules


def test_official_ffhq_pickle_metadata(tmp_path):
    g = build_generator("ffhq512-128", seed=0)
    path = tmp_path / "ffhqrebalanced512-128.pkl"
    path.write_bytes(official_pickle_bytes(g))
    loaded = load_generator(path)
    assert loaded.config == g.config
    assert loaded.neural_rendering_resolution == 128
    assert loaded.rendering_kwargs["superresolution_noise_mode"] == "none"
    assert state_fingerprint(loaded) == state_fingerprint(g)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _EvalEvil:
    def __reduce__(self):
        return (eval, ("__import__('os').getcwd()",))


@pytest.mark.parametrize("make", ["os.system", "builtins.eval", "persistent-source"])
def test_forbidden_globals_are_refused_and_nothing_runs(tmp_path, make):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pkl"
    if make == "os.system":
        path.write_bytes(pickle.dumps({"G_ema": _Evil(marker)}))
    elif make == "builtins.eval":
        path.write_bytes(pickle.dumps({"G_ema": _EvalEvil()}))
    else:
        # a legitimate-looking pickle whose persistent objects carry hostile module source:
        # the source must be kept as text, never executed.
        g = build_generator("tiny", seed=0)
        path.write_bytes(official_pickle_bytes(g))
        loaded = load_generator(path)
        assert loaded is not None and not marker.exists()
        return
    with pytest.raises(CheckpointError, match="not on the allow-list"):
        load_generator(path)
    assert not marker.exists()


def test_embedded_source_is_kept_as_text(tmp_path):
    from guide_fast.checkpoints import read_official_pickle

    path = tmp_path / "g.pkl"
    path.write_bytes(official_pickle_bytes(build_generator("tiny", seed=0)))
    stub, state = read_official_pickle(path)
    assert stub.class_name == "TriPlaneGenerator"
    assert "os.system" in stub.module_src  # the hostile stand-in text is there, unexecuted
    assert len(state) == len(build_generator("tiny", seed=0).state_dict())


def test_truncated_corrupt_and_wrong_files(tmp_path):
    good = official_pickle_bytes(build_generator("tiny", seed=0))
    (tmp_path / "trunc.pkl").write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_generator(tmp_path / "trunc.pkl")
    (tmp_path / "junk.pkl").write_bytes(b"\x80\x04" + os.urandom(200))
    with pytest.raises(CheckpointError):
        load_generator(tmp_path / "junk.pkl")
    (tmp_path / "text.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="neither"):
        load_generator(tmp_path / "text.txt")
    with pytest.raises(CheckpointError, match="not found"):
        load_generator(tmp_path / "missing.pkl")
    (tmp_path / "nog.pkl").write_bytes(pickle.dumps({"G": 1}))
    with pytest.raises(CheckpointError, match="G_ema"):
        load_generator(tmp_path / "nog.pkl")
    st = tmp_path / "g.safetensors"
    save_generator(build_generator("tiny", seed=0), st)
    data = st.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="safetensors"):
        load_generator(tmp_path / "cut.safetensors")


def test_pickle_with_wrong_tensors_lists_differences(tmp_path):
    g = build_generator("tiny", seed=0)
    data = official_pickle_bytes(g)
    # rename one module in the byte stream: its tensors become unexpected, the model's missing
    broken = data.replace(b"affine", b"affinX", 1)
    (tmp_path / "b.pkl").write_bytes(broken)
    with pytest.raises(CheckpointError, match="missing"):
        load_generator(tmp_path / "b.pkl")


def test_safetensors_round_trip_is_exact(tmp_path):
    g = build_generator("tiny", seed=7)
    g.source_sha256 = "ab" * 32
    path = save_generator(g, tmp_path / "g.safetensors")
    loaded = load_generator(path)
    _assert_same_weights(g, loaded)
    assert loaded.config == g.config
    assert loaded.source_sha256 == "ab" * 32
    assert not list(tmp_path.glob(".g.safetensors.*")), "no temporary file left behind"


def test_convert_cli_round_trips_to_identical_outputs(tmp_path, capsys):
    g = build_generator("tiny", seed=11)
    src = tmp_path / "eg3d.pkl"
    src.write_bytes(official_pickle_bytes(g))
    dst = tmp_path / "eg3d.safetensors"
    assert cli_main(["convert", str(src), str(dst)]) == 0
    assert "wrote" in capsys.readouterr().out
    converted = load_generator(dst)
    a, b = _outputs(g), _outputs(converted)
    for k in a:
        assert torch.equal(a[k], b[k])
    from guide_fast.checkpoints import sha256_file

    assert converted.source_sha256 == sha256_file(src)
    assert cli_main(["convert", str(tmp_path / "nope.pkl"), str(tmp_path / "x.safetensors")]) == 2
    assert not (tmp_path / "x.safetensors").exists()


def test_delta_apply_and_revert(tmp_path):
    src = build_generator("tiny", seed=0)
    new = src.copy()
    with torch.no_grad():
        for name, p in new.named_parameters():
            if name.startswith("backbone.synthesis."):
                p.add_(torch.randn_like(p) * 1e-2)
    path = save_delta(src, new, tmp_path / "delta.safetensors")
    delta, meta = load_delta(path)
    assert all(k.startswith("backbone.synthesis.") for k in delta)
    assert meta["source_fingerprint"] == state_fingerprint(src)
    applied = apply_delta(src.copy(), delta, meta)
    for (k, a), b in zip(applied.state_dict().items(), new.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=k)
    reverted = apply_delta(applied, delta, meta, sign=-1)
    for (k, a), b in zip(reverted.state_dict().items(), src.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=k)
    other = build_generator("tiny", seed=1)
    with pytest.raises(CheckpointError, match="different source"):
        apply_delta(other, delta, meta)


def test_non_finite_generators_are_neither_loaded_nor_written(tmp_path):
    from guide_fast.checkpoints import load_generator, save_generator
    from guide_fast.errors import GuideFastError

    g = build_generator("tiny", seed=0)
    path = save_generator(g, tmp_path / "ok.safetensors")
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    state = load_file(str(path))
    name = "backbone.synthesis.b8.conv0.weight"
    state[name][0, 0, 0, 0] = float("nan")
    save_file(state, str(tmp_path / "nan.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match=r"1 non-finite values in 1 tensors \(first: backbone.synthesis.b8"):
        load_generator(tmp_path / "nan.safetensors")
    with torch.no_grad():
        g.backbone.synthesis.b8.conv0.weight[0, 0, 0, 0] = float("inf")
    with pytest.raises(GuideFastError, match="refusing to write"):
        save_generator(g, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left behind


def test_plain_file_readers_say_what_is_wrong(tmp_path):
    from guide_fast.checkpoints import load_latents, read_npy_file, read_torch_file, save_generator

    text = tmp_path / "notes.pt"
    text.write_text("just some text\n")
    with pytest.raises(CheckpointError, match="not a PyTorch file"):
        read_torch_file(text, "latent file")
    with pytest.raises(CheckpointError, match="is a folder"):
        load_latents(tmp_path)
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="is empty"):
        read_torch_file(tmp_path / "empty.pth", "weights")
    (tmp_path / "text.npy").write_text("1 2 3\n")
    with pytest.raises(CheckpointError, match="not a .npy array file"):
        read_npy_file(tmp_path / "text.npy", "real-image features")
    import numpy as np

    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(CheckpointError, match="object array"):
        read_npy_file(tmp_path / "obj.npy")
    gen_file = save_generator(build_generator("tiny", seed=0), tmp_path / "g.safetensors")
    with pytest.raises(CheckpointError, match=r"no latent tensor found .*\.\.\. \(\d+ in all\)") as info:
        load_latents(gen_file)
    assert len(str(info.value)) < 600  # a short key list, not the whole generator
    onnx_text = tmp_path / "model.onnx"
    onnx_text.write_text("not protobuf")
    from guide_fast.identity.onnx_export import onnx_metadata

    with pytest.raises(CheckpointError, match="not a readable ONNX file"):
        onnx_metadata(onnx_text)
