"""The GOAE encoder (guide_fast.inversion.goae): the official key layout, loading and its errors,
the two modes, the W+ structure and the preprocessing. Random weights. The tiny configuration
(embed 32, depths [2, 2, 2, 2]) keeps the official wiring at 256² input; most tests use a micro
one at 128² (window 8: shifted windows in the first two stages, whole-map windows in the last two,
as the official configuration at 256²) to stay fast on two CPU cores. Bit-parity with GUIDE's own
goae.GOAEncoder on the same random weights (both modes) was checked outside the test suite."""
import math
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from guide_fast.errors import CheckpointError, InputError
from guide_fast.inversion.goae import (
    OFFICIAL,
    GOAEConfig,
    GOAEncoder,
    expected_state,
    load_encoder,
    preprocess_for_goae,
)

sys.path.insert(0, os.path.dirname(__file__))
from goae_files import MICRO, random_state, use_micro_in_manifest  # noqa: E402
from reference_data import KEYLISTS  # noqa: E402

TINY = GOAEConfig.tiny()
# Generated from GUIDE's goae.GOAEncoder(get_config(), mlp_layer=2, stage_list=[10000, 20000, 30000])
# with random weights: key, shape, param|buffer, dtype in state_dict order (keylists/README.txt format).
KEYLIST = KEYLISTS / "goae_encoder_ffhq.tsv"


def _rows(config):
    with torch.device("meta"):
        enc = GOAEncoder(config)
    params = {n for n, _ in enc.named_parameters()}
    return [(k, "x".join(map(str, v.shape)) or "scalar", "param" if k in params else "buffer",
             str(v.dtype).replace("torch.", "")) for k, v in enc.state_dict().items()]


def test_official_layout_equals_guides_file_keys():
    want = [tuple(line.split("\t")) for line in KEYLIST.read_text().splitlines()]
    got = _rows(OFFICIAL)
    assert got == want  # names, order, shapes, parameter vs buffer, dtype
    assert len(got) == 545 and sum(r[2] == "buffer" for r in got) == 50
    assert sum(v.numel() for k, v in expected_state(OFFICIAL).items() if not k.endswith(
        ("relative_coords_table", "relative_position_index", "attn_mask"))) == 111_218_822
    # Windows: 16 in stages 1-3, 8 (whole map) in stage 4; shifted-window masks only in stages 1-2.
    masks = [r[0] for r in got if r[0].endswith("attn_mask")]
    assert masks == ["swin_model.layers.0.blocks.1.attn_mask", "swin_model.layers.1.blocks.1.attn_mask"]
    idx = {r[0].split(".attn.")[0]: r[1] for r in got if r[0].endswith("relative_position_index")}
    assert idx["swin_model.layers.2.blocks.17"] == "256x256" and idx["swin_model.layers.3.blocks.1"] == "64x64"


def test_tiny_config_has_the_official_names():
    full = [r[0] for r in _rows(OFFICIAL)]
    kept = [k for k in full if not (k.startswith("swin_model.layers.2.blocks.") and int(k.split(".")[4]) >= 2)]
    assert [r[0] for r in _rows(TINY)] == kept == [r[0] for r in _rows(MICRO)]


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("goae") / "encoder_micro.pt"
    state = random_state(MICRO, seed=3)
    torch.save(state, path)
    return path, state


@pytest.fixture(scope="module")
def tiny_enc(tiny_file):
    return load_encoder(tiny_file[0], config=MICRO)


@pytest.fixture(scope="module")
def images():
    return torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_round_trip_through_torch_save_at_256(tmp_path):
    state = random_state(TINY, seed=4)
    torch.save(state, tmp_path / "encoder.pt")
    enc = load_encoder(tmp_path / "encoder.pt", config=TINY)
    got = enc.state_dict()
    assert list(got) == list(state) and all(torch.equal(got[k], state[k]) for k in state)
    assert got["swin_model.layers.0.blocks.0.attn.relative_position_index"].dtype == torch.int64
    assert not enc.training and enc.mode == "eval"
    x = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(1)) * 2 - 1
    w = enc(x)
    assert w.shape == (1, 14, 512) and w.dtype == torch.float32 and bool(torch.isfinite(w).all())
    assert w.grad_fn is None  # inference only


def test_loaded_encoder_computes_what_the_module_does(tiny_file, tiny_enc, images):
    # Parameters keep requires_grad=True as in GUIDE's module: freezing them changes matmul's
    # folding and so the rounding; the loaded encoder must equal a module filled by load_state_dict.
    assert all(p.requires_grad for p in tiny_enc.parameters())
    ref = GOAEncoder(MICRO).eval()
    ref.load_state_dict(tiny_file[1])
    assert torch.equal(ref(images), tiny_enc(images))


def _edit(state, change):
    state = dict(state)
    change(state)
    return state


BAD = {
    "missing key": (lambda s: s.pop("cross_att_fine.linear2.bias"), "1 missing key(s): cross_att_fine.linear2.bias"),
    "unexpected key": (lambda s: s.__setitem__("swin_model.head.weight", torch.zeros(3, 3)),
                       "unexpected key(s): swin_model.head.weight"),
    "wrong shape": (lambda s: s.__setitem__("mapper_base_channel.2.weight", torch.zeros(512, 127)),
                    "mapper_base_channel.2.weight: file [512, 127], expected [512, 128]"),
    "non-finite": (lambda s: s["swin_model.layers.1.blocks.0.mlp.fc1.weight"].__setitem__((0, 0), float("nan")),
                   "non-finite values (NaN / inf) in swin_model.layers.1.blocks.0.mlp.fc1.weight"),
    "scrambled index": (lambda s: s.__setitem__("swin_model.layers.3.blocks.0.attn.relative_position_index",
                                                s["swin_model.layers.3.blocks.0.attn.relative_position_index"].flip(0)),
                        "is not the relative position index of a 4x4 window"),
    "integer weights": (lambda s: s.__setitem__("mapper_mid_channel.0.bias", torch.zeros(512, dtype=torch.int64)),
                        "mapper_mid_channel.0.bias is torch.int64, expected a floating tensor"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_state_dicts_give_one_line_errors(case, tiny_file, tmp_path):
    change, expect = BAD[case]
    state = {k: v.clone() for k, v in tiny_file[1].items()}
    path = tmp_path / "encoder.pt"
    torch.save(_edit(state, change), path)
    with pytest.raises(CheckpointError) as exc:
        load_encoder(path, config=MICRO)
    msg = str(exc.value)
    assert expect in msg and str(path) in msg and "\n" not in msg


def test_other_files_give_one_line_errors(tiny_file, tmp_path):
    cases = {
        "tensor.pt": (lambda p: torch.save(torch.zeros(3), p), "holds a Tensor"),
        "text.pt": (lambda p: p.write_text("hello"), "not a PyTorch file"),
        "other.pt": (lambda p: torch.save({"encoder.w": torch.zeros(2)}, p), "no swin_model.* keys"),
    }
    for name, (write, expect) in cases.items():
        write(tmp_path / name)
        with pytest.raises(CheckpointError) as exc:
            load_encoder(tmp_path / name, config=MICRO)
        assert expect in str(exc.value) and "\n" not in str(exc.value), name
    # The micro file is not the official architecture: the differences are named.
    with pytest.raises(CheckpointError, match=r"not the state_dict of GOAEncoder\(Swin-V2 256², embed 128.*missing key"):
        load_encoder(tiny_file[0])


def test_manifest_entry_runs_the_encoder_checks(tiny_file, monkeypatch):
    from guide_fast import weights

    status = weights.check("goae", tiny_file[0])  # the official architecture is expected
    assert status.status == "invalid" and "missing key(s): swin_model.layers.2.blocks." in status.detail
    assert "shape mismatch" in status.detail and "\n" not in status.detail
    use_micro_in_manifest(monkeypatch)
    status = weights.check("goae", tiny_file[0])
    assert status.status == "valid", status.detail
    n = len(tiny_file[1])
    assert f"{n} tensors (" in status.detail and "keys and shapes as GUIDE's goae.GOAEncoder" in status.detail
    assert "GOAE" in weights.MANIFEST["goae"].description and "545" in weights.MANIFEST["goae"].format


def test_eval_mode_is_bit_identical_across_calls(tiny_enc, images):
    a, b = tiny_enc(images), tiny_enc(images, seed=1)
    assert torch.equal(a, b)
    # Each photo is encoded on its own: batching does not mix them.
    one = tiny_enc(images[1:])
    torch.testing.assert_close(one, a[1:], rtol=1e-4, atol=1e-5)


def test_official_mode_is_seeded(tiny_file, tiny_enc, images):
    enc = load_encoder(tiny_file[0], mode="official", config=MICRO)
    assert enc.training and enc.mode == "official"
    images = images[:1]
    state = torch.get_rng_state()
    s7, s7b, s8 = enc(images, seed=7), enc(images, seed=7), enc(images, seed=8)
    assert torch.equal(torch.get_rng_state(), state)  # the seed kwarg leaves the global stream alone
    assert torch.equal(s7, s7b) and not torch.equal(s7, s8)
    torch.manual_seed(7)
    assert torch.equal(enc(images), s7)  # torch.manual_seed + enc(x) is the same draw
    assert not torch.equal(enc(images), s7)  # the stream moved on
    diff = (s7 - tiny_enc(images)).abs().mean()
    assert diff > 1e-3  # dropout and drop-path change w


def test_official_mode_draws_from_drop_path_and_cross_attention_dropout(tiny_file, images):
    enc = load_encoder(tiny_file[0], mode="official", config=MICRO)
    x = images[:1]
    enc.swin_model.eval()   # only the heads' dropout left
    assert not torch.equal(enc(x, seed=1), enc(x, seed=2))
    enc.train()
    for name in ("cross_att_coarse", "cross_att_mid", "cross_att_fine"):
        getattr(enc, name).eval()  # only drop-path left
    assert not torch.equal(enc(x, seed=1), enc(x, seed=2))
    enc.eval()
    assert torch.equal(enc(x, seed=1), enc(x, seed=2))


def test_w_plus_structure(tiny_enc, images):
    w, base = tiny_enc(images, return_base=True)
    assert base.shape == (2, 14, 512) and torch.equal(base, base[:, :1].expand_as(base))
    assert torch.equal(w[:, 0], base[:, 0])  # row 0 is the base latent alone
    assert bool(((w - base)[:, 1:].abs().amax(-1) > 0).all())  # rows 1-13 get the cross-attention terms


def test_logit_scale_is_clamped_at_log_100(tiny_file, images):
    enc = load_encoder(tiny_file[0], config=MICRO)
    x = images[:1]
    scales = [m for n, m in enc.named_parameters() if n.endswith("logit_scale")]
    for p in scales:
        p.data.fill_(math.log(100.0))
    at_cap = enc(x)
    for p in scales:
        p.data.fill_(9.0)
    assert torch.equal(enc(x), at_cap)
    for p in scales:
        p.data.fill_(3.0)
    assert not torch.allclose(enc(x), at_cap)


def test_position_coordinates_use_the_pretrained_window():
    from guide_fast.inversion.swin import relative_coords_table

    table = relative_coords_table(16, 12)
    assert table.shape == (1, 31, 31, 2)
    assert math.isclose(float(table.max()), math.log2(8 * 15 / 11 + 1) / 3, rel_tol=1e-6)
    assert math.isclose(float(relative_coords_table(8, 6).max()), math.log2(8 * 7 / 5 + 1) / 3, rel_tol=1e-6)
    assert math.isclose(float(relative_coords_table(8, 0).max()), math.log2(9) / 3, rel_tol=1e-6)  # (w - 1) instead


def test_input_checks(tiny_enc, tiny_file):
    with pytest.raises(InputError, match=r"\[B, 3, 128, 128\]"):
        tiny_enc(torch.zeros(1, 3, 256, 256))
    with pytest.raises(InputError, match="float tensor"):
        tiny_enc(torch.zeros(1, 3, 128, 128, dtype=torch.uint8))
    bad = torch.zeros(1, 3, 128, 128)
    bad[0, 0, 0, 0] = float("inf")
    with pytest.raises(InputError, match="non-finite"):
        tiny_enc(bad)
    with pytest.raises(InputError, match="preprocess_for_goae"):
        tiny_enc(np.zeros((1, 3, 128, 128), np.float32))
    with pytest.raises(InputError, match="unknown GOAE mode"):
        load_encoder(tiny_file[0], mode="train", config=MICRO)
    with pytest.raises(InputError, match="device"):
        load_encoder(tiny_file[0], device="gpu", config=MICRO)
    with pytest.raises(InputError, match="seed"):
        load_encoder(tiny_file[0], mode="official", config=MICRO)(torch.zeros(1, 3, 128, 128), seed=-1)
    with pytest.raises(InputError, match="divisible"):
        GOAEConfig(embed_dim=30)


# ---------------------------------------------------------------------------------------------
# Preprocessing
# ---------------------------------------------------------------------------------------------

def _official(img: Image.Image) -> torch.Tensor:
    """GUIDE's unlearn.image_to_tensor: Image.resize((256, 256)) with PIL's default filter."""
    a = np.array(img.convert("RGB").resize((256, 256))).transpose(2, 0, 1)
    return torch.from_numpy(a).to(torch.float32) / 127.5 - 1


def test_preprocessing_is_guides_pil_bicubic_resize():
    from skimage import data

    photo = data.astronaut()  # 512 x 512 x 3 uint8
    pil = Image.fromarray(photo)
    x = preprocess_for_goae(pil)
    assert x.shape == (1, 3, 256, 256) and x.dtype == torch.float32
    assert torch.equal(x[0], _official(pil))
    bicubic = np.array(pil.resize((256, 256), Image.Resampling.BICUBIC)).transpose(2, 0, 1)
    assert torch.equal(x[0], torch.from_numpy(bicubic).float() / 127.5 - 1)  # PIL's default is bicubic
    bilinear = np.array(pil.resize((256, 256), Image.Resampling.BILINEAR)).transpose(2, 0, 1)
    assert not torch.equal(x[0], torch.from_numpy(bilinear).float() / 127.5 - 1)
    # Arrays, batches and lists give the same numbers; already-256 images are only rescaled.
    assert torch.equal(preprocess_for_goae(photo), x)
    assert torch.equal(preprocess_for_goae(np.stack([photo, photo[::-1]])), preprocess_for_goae([pil, photo[::-1]]))
    small = photo[::2, ::2].copy()
    assert torch.equal(preprocess_for_goae(small)[0], torch.from_numpy(small.transpose(2, 0, 1)).float() / 127.5 - 1)
    assert float(x.min()) >= -1 and float(x.max()) <= 1


def test_preprocessing_converts_modes_and_refuses_other_inputs():
    gray = np.random.default_rng(0).integers(0, 256, (300, 200), dtype=np.uint8)
    g = preprocess_for_goae(gray)
    assert g.shape == (1, 3, 256, 256) and torch.equal(g[0, 0], g[0, 1]) and torch.equal(g[0, 1], g[0, 2])
    rgba = np.dstack([np.full((64, 64, 3), 200, np.uint8), np.zeros((64, 64), np.uint8)])
    assert torch.equal(preprocess_for_goae(rgba), preprocess_for_goae(rgba[:, :, :3]))
    for bad, expect in [(np.zeros((8, 8, 3), np.float32), "uint8 array expected"), ([], "no images"),
                        (np.zeros((8, 8, 2), np.uint8), "expected [H, W]"), ("photo.png", "PIL images or uint8")]:
        with pytest.raises(InputError) as exc:
            preprocess_for_goae(bad)
        assert expect in str(exc.value)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_eval_matches_cpu_and_official_mode_is_seeded(tiny_file, images):
    x = images.cuda()
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # fp32 against the CPU
    try:
        enc = load_encoder(tiny_file[0], device="cuda", config=MICRO)
        a = enc(x)
        assert a.is_cuda and torch.equal(a, enc(x))
        torch.testing.assert_close(a.cpu(), load_encoder(tiny_file[0], config=MICRO)(images), rtol=1e-4, atol=1e-4)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags
    off = load_encoder(tiny_file[0], device="cuda", mode="official", config=MICRO)
    state = torch.cuda.get_rng_state()
    s1, s1b, s2 = off(x, seed=1), off(x, seed=1), off(x, seed=2)
    assert torch.equal(torch.cuda.get_rng_state(), state)  # the CUDA stream outside is untouched
    assert torch.equal(s1, s1b) and not torch.equal(s1, s2)
    torch.cuda.manual_seed(1)
    assert torch.equal(off(x), s1)  # seed=S is the device generator seeded with S
