"""Safe checkpoint loading (docs/eg3d.md §7.4), own format, convert, deltas."""
import json
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
from guide_fast.errors import CheckpointError, InputError
from guide_fast.render import make_render_draws

sys.path.insert(0, os.path.dirname(__file__))
from official_pickle import OFFICIAL_RELEASES, SHAPENET_KWARGS, official_pickle_bytes, official_release_pickle  # noqa: E402


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


def _perturbed(src, scale=1e-2, seed=0):
    new = src.copy()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in new.named_parameters():
            if name.startswith("backbone.synthesis."):
                p.add_(torch.randn(p.shape, generator=g) * scale)
    return new


def test_delta_apply_and_revert_are_bit_exact_and_checked(tmp_path):
    src = build_generator("tiny", seed=0)
    new = _perturbed(src)
    with torch.no_grad():  # magnitudes far apart: the float64 difference alone is not exact here
        p = new.backbone.synthesis.b4.conv1.weight
        src.backbone.synthesis.b4.conv1.weight.view(-1)[:3] = torch.tensor([1e-30, 3e-20, 0.0])
        p.view(-1)[:3] = torch.tensor([0.5, -7.0, 1e-38])
    path = save_delta(src, new, tmp_path / "delta.safetensors")
    delta, meta = load_delta(path)
    assert all(k.startswith("backbone.synthesis.") for k in delta)
    assert any("::fix_" in k for k in delta), "the far-apart magnitudes need the exact-value patch"
    assert meta["source_fingerprint"] == state_fingerprint(src)
    assert meta["result_fingerprint"] == state_fingerprint(new)
    applied = apply_delta(src.copy(), delta, meta)
    _assert_same_weights(applied, new)
    reverted = apply_delta(applied, delta, meta, sign=-1)
    _assert_same_weights(reverted, src)
    again = apply_delta(reverted, delta, meta)        # keep only the delta: apply, revert, apply ...
    assert state_fingerprint(again) == meta["result_fingerprint"]
    other = build_generator("tiny", seed=1)
    with pytest.raises(CheckpointError, match="different source"):
        apply_delta(other, delta, meta)
    with pytest.raises(CheckpointError, match="different result"):   # revert on the wrong generator
        apply_delta(src.copy(), delta, meta, sign=-1)
    for sign in (float("nan"), 2, 0.5, 0, True, "1"):
        with pytest.raises(InputError, match="sign must be"):
            apply_delta(src.copy(), delta, meta, sign=sign)
    with pytest.raises(CheckpointError, match="without metadata"):
        apply_delta(src.copy(), delta, None)
    _assert_same_weights(apply_delta(src.copy(), delta, None, force=True), new)
    with pytest.raises(InputError, match="reserved"):
        save_delta(src, new, tmp_path / "d2.safetensors", extra={"config": {"lr": 1}})
    assert json.loads(meta["config"]) == src.config.to_dict()


def test_unlearning_twice_records_the_fingerprint_chain(tmp_path, capsys):
    from guide_fast.checkpoints import checkpoint_history

    g0 = build_generator("tiny", seed=2)
    pkl = tmp_path / "eg3d.pkl"
    pkl.write_bytes(official_pickle_bytes(g0))
    src = load_generator(pkl)
    fp0 = state_fingerprint(src)
    assert [s["action"] for s in src.checkpoint_history] == ["origin"]
    from guide_fast.checkpoints.format import history_with

    g1 = _perturbed(src, seed=1)
    g1.checkpoint_history = history_with(g1, action="unlearn", identities=1)
    save_generator(g1, tmp_path / "g1.safetensors")
    l1 = load_generator(tmp_path / "g1.safetensors")
    g2 = _perturbed(l1, seed=2)
    g2.checkpoint_history = history_with(g2, action="unlearn", identities=2)
    save_delta(l1, g2, tmp_path / "d2.safetensors")
    save_generator(g2, tmp_path / "g2.safetensors")
    info = checkpoint_history(tmp_path / "g2.safetensors")
    chain = info["history"]
    assert [s["action"] for s in chain] == ["origin", "unlearn", "unlearn"]
    assert chain[0]["result"] == fp0 and chain[1]["parent"] == fp0
    assert chain[1]["result"] == state_fingerprint(l1) == chain[2]["parent"]
    assert chain[2]["result"] == info["fingerprint"] == state_fingerprint(g2)
    _, meta = load_delta(tmp_path / "d2.safetensors")
    assert json.loads(meta["history"]) == chain
    assert cli_main(["history", str(tmp_path / "g2.safetensors")]) == 0
    out = capsys.readouterr().out
    assert f"{fp0[:16]} -> {chain[1]['result'][:16]}" in out and "2. unlearn" in out and "identities=2" in out
    # a broken chain in the metadata is refused
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(tmp_path / "g2.safetensors"), framework="pt") as f:
        m = dict(f.metadata())
    bad = json.loads(m["history"])
    bad[2]["parent"] = "0" * 64
    m["history"] = json.dumps(bad)
    save_file(load_file(str(tmp_path / "g2.safetensors")), str(tmp_path / "bad.safetensors"), metadata=m)
    with pytest.raises(CheckpointError, match="does not continue"):
        load_generator(tmp_path / "bad.safetensors")


@pytest.mark.parametrize("release", list(OFFICIAL_RELEASES))
def test_every_official_configuration_loads(tmp_path, release):
    gen, data = official_release_pickle(release)
    path = tmp_path / f"{release}.pkl"
    path.write_bytes(data)
    loaded = load_generator(path)
    nrr = OFFICIAL_RELEASES[release][0]
    assert loaded.config == gen.config and loaded.neural_rendering_resolution == nrr
    assert loaded.superresolution.in_resolution == 128 and loaded.config.img_resolution == 512
    assert loaded.superresolution.antialias is True and len(loaded.state_dict()) == 177
    assert loaded.rendering_kwargs["superresolution_noise_mode"] == "none"
    assert state_fingerprint(loaded) == state_fingerprint(gen)


def test_shapenet_cars_is_refused_with_the_reason(tmp_path):
    g = build_generator("tiny", seed=0)
    path = tmp_path / "shapenetcars128-64.pkl"
    path.write_bytes(official_pickle_bytes(g, rendering_kwargs=SHAPENET_KWARGS,
                                           init_kwargs={"img_resolution": 128}, g_attrs={"neural_rendering_resolution": 64}))
    with pytest.raises(CheckpointError, match=r"SuperresolutionHybrid2X.*ShapeNet cars.*SynthesisBlockNoUp"):
        load_generator(path)


def test_low_rendering_resolution_is_resized_with_sr_antialias():
    """ffhq512-64's rule at a tiny size: the 16x16 render is resized to the SR input (32) with
    F.interpolate(bilinear, antialias=rendering_kwargs['sr_antialias']), as the official SR."""
    from guide_fast.eg3d.generator import PRESETS, TriPlaneGenerator
    from dataclasses import replace

    base = PRESETS["tiny"]()
    outs = {}
    for aa in (True, False):
        cfg = replace(base, neural_rendering_resolution=16, rendering_kwargs={**base.rendering_kwargs, "sr_antialias": aa})
        torch.manual_seed(0)
        g = TriPlaneGenerator(cfg).eval().requires_grad_(False)
        assert g.superresolution.in_resolution == 32 and g.superresolution.antialias is aa
        rgb = torch.randn(1, 3, 16, 16)
        feat = torch.cat([rgb, torch.randn(1, cfg.decoder_output_dim - 3, 16, 16)], 1)
        ws = torch.randn(1, g.num_ws, cfg.w_dim)
        up = torch.nn.functional.interpolate(feat, size=(32, 32), mode="bilinear", align_corners=False, antialias=aa)
        with torch.no_grad():
            got = g.superresolution(rgb, feat, ws)
            want = g.superresolution(up[:, :3], up, ws)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        outs[aa] = _outputs(g)["image"]
        assert outs[aa].shape == (2, 3, 64, 64) and torch.isfinite(outs[aa]).all()


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
