"""From a photo to an identity (issue 6): EG3D framing, camera, W+ inversion (guide_fast/inversion/).

CPU only. The framing maths needs nothing but numpy; the detection tests need facenet-pytorch
(bundled MTCNN weights) and scikit-image (the astronaut photo) and are skipped without them. The
inversion tests run the tiny generator with random weights, LPIPS.random and a small stand-in
identity network (IR-SE50 costs seconds per step on two cores); a random-weight render holds no
detectable face, so they feed pre-aligned renders (align=False).
"""
import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image

from small_nets import SmallFaceNet  # noqa: E402
from guide_fast import cameras
from guide_fast.errors import InputError
from guide_fast.identity import IdentityLoss, MultipleFacesError, NoFaceError
from guide_fast.inversion import (
    FFHQ_POINTS_512,
    LM3D_STD,
    PIXELS_PER_UNIT,
    AlignedPhoto,
    InversionError,
    InversionResult,
    align_photo,
    ffhq_points,
    framing_matrix,
    invert_images,
    list_photos,
    pos_fit,
)
from guide_fast.io import save_image, to_uint8
from guide_fast.perceptual import LPIPS
from guide_fast.render import make_render_draws

# facenet-pytorch's MTCNN landmarks on skimage's astronaut (docs/face_models.md §5.3)
ASTRONAUT_POINTS = np.array([
    [205.0109100341797, 101.72744750976562], [246.7625732421875, 103.71408081054688],
    [224.67135620117188, 128.96499633789062], [201.7161102294922, 139.2461700439453],
    [245.26548767089844, 141.8570098876953],
])


def _needs_detector():
    pytest.importorskip("facenet_pytorch", reason="MTCNN alignment needs facenet-pytorch")
    data = pytest.importorskip("skimage.data", reason="the astronaut photo comes from scikit-image")
    return data


@pytest.fixture(scope="module")
def astronaut():
    return _needs_detector().astronaut()


@pytest.fixture(scope="module")
def astronaut_aligned(astronaut):
    return align_photo(astronaut)


# ----------------------------------------------------------------- framing constants (no MTCNN)

def test_ffhq_points_are_the_frontal_projection_of_the_template():
    # docs/eg3d.md §6 / module docstring: 300 px per template unit at 1024, centre crop 700 -> 512.
    assert PIXELS_PER_UNIT == pytest.approx(219.428571, abs=1e-5)
    np.testing.assert_allclose(FFHQ_POINTS_512[:, 0], 255.5 + PIXELS_PER_UNIT * LM3D_STD[:, 0])
    np.testing.assert_allclose(FFHQ_POINTS_512[:, 1], 255.5 - PIXELS_PER_UNIT * LM3D_STD[:, 1])
    np.testing.assert_allclose(FFHQ_POINTS_512[0], [187.15, 191.79], atol=0.01)   # left eye
    np.testing.assert_allclose(FFHQ_POINTS_512[1], [323.48, 191.93], atol=0.01)   # right eye
    assert FFHQ_POINTS_512[1, 0] - FFHQ_POINTS_512[0, 0] == pytest.approx(136.33, abs=0.01)
    # other sizes scale about pixel centres: the crop centre stays the centre
    np.testing.assert_allclose(ffhq_points(64), (FFHQ_POINTS_512 + 0.5) / 8 - 0.5)


def test_both_methods_agree_on_a_frontal_upright_face():
    # Landmarks that are exactly a frontal projection of the template (scale 70 px/unit, shifted):
    # the 2D similarity fit and the POS (EG3D) fit must give the same matrix, and both put the
    # points on FFHQ_POINTS_512.
    s, t = 70.0, np.array([311.0, 207.0])
    pts = t + s * np.stack([LM3D_STD[:, 0], -LM3D_STD[:, 1]], 1)
    t_fit, s_fit = pos_fit(pts)
    np.testing.assert_allclose(t_fit, t, atol=1e-9)
    assert s_fit == pytest.approx(s, rel=1e-9)
    m_sim = framing_matrix(pts, 512, "similarity")
    m_pos = framing_matrix(pts, 512, "eg3d")
    np.testing.assert_allclose(m_sim, m_pos, atol=1e-8)
    np.testing.assert_allclose(m_sim[:, :2] @ pts.T + m_sim[:, 2:], FFHQ_POINTS_512.T, atol=1e-8)
    with pytest.raises(InputError, match="method"):
        framing_matrix(pts, 512, "dlib")


def _eg3d_recipe(image: np.ndarray, lm: np.ndarray):
    """EG3D's crop_images_in_the_wild.py recipe, re-done with PIL as an oracle: y-up landmarks,
    POS, resize by 300/s, 1024 crop around t, central 700, LANCZOS to 512. Returns the crop and
    where the landmarks end up (followed through the same integer offsets and resizes)."""
    im = Image.fromarray(image)
    w0, h0 = im.size
    lm_up = lm.copy()
    lm_up[:, 1] = h0 - 1 - lm_up[:, 1]
    t, s = pos_fit(lm_up)
    s = 300.0 / s
    w, h = int(w0 * s), int(h0 * s)
    left = int(w / 2 - 512 + (t[0] - w0 / 2) * s)
    up = int(h / 2 - 512 + (h0 / 2 - t[1]) * s)
    im = im.resize((w, h), Image.BICUBIC).crop((left, up, left + 1024, up + 1024))
    c = int(1024 / 2 - 700 / 2)
    im = im.crop((c, c, c + 700, c + 700)).resize((512, 512), Image.LANCZOS)
    p = (lm + 0.5) * np.array([w / w0, h / h0]) - 0.5 - np.array([left + c, up + c])
    return np.asarray(im), (p + 0.5) * 512 / 700 - 0.5


def test_eg3d_method_reproduces_the_eg3d_crop_recipe():
    data = pytest.importorskip("skimage.data")
    # At 4x the astronaut's size the recipe resizes by s' = 300/s ~ 1.1, where its half-pixel
    # conventions cost about 0.37 s' px plus up to 0.73 px of integer truncation, i.e. < 1.5 px
    # (module docstring).
    big = np.asarray(Image.fromarray(data.astronaut()).resize((2048, 2048), Image.BICUBIC))
    lm = (ASTRONAUT_POINTS + 0.5) * 4 - 0.5
    crop, recipe_points = _eg3d_recipe(big, lm)
    m = framing_matrix(lm, 512, "eg3d")
    ours = m[:, :2] @ lm.T + m[:, 2:]
    err = np.abs(ours.T - recipe_points)
    print("eg3d method vs recipe, 4x astronaut: max |d| =", err.max().round(3), "px")
    assert err.max() < 1.5
    from guide_fast.inversion.framing import _warp_window

    mine = _warp_window(big, m, 512).astype(np.float64)
    diff = np.abs(mine - crop).mean()
    print("eg3d method vs recipe crop: mean |d| =", round(diff, 2), "grey levels")
    assert diff < 4.0  # bilinear vs bicubic+LANCZOS resampling and the < 1 px offset
    # At 1x (s' ~ 4.5) the recipe's own offsets grow to 0.37 s' ~ 1.7 px (+ truncation)
    _, recipe_small = _eg3d_recipe(data.astronaut(), ASTRONAUT_POINTS)
    m1 = framing_matrix(ASTRONAUT_POINTS, 512, "eg3d")
    err1 = np.abs((m1[:, :2] @ ASTRONAUT_POINTS.T + m1[:, 2:]).T - recipe_small)
    print("eg3d method vs recipe, 512 astronaut: max |d| =", err1.max().round(3), "px")
    assert err1.max() < 3.0


# ----------------------------------------------------------------- detection and alignment

def test_astronaut_aligned_crop_puts_the_eyes_where_the_framing_does(astronaut_aligned):
    from guide_fast.identity.align import detect_faces

    p = astronaut_aligned
    assert isinstance(p, AlignedPhoto)
    assert p.image.shape == (512, 512, 3) and p.image.dtype == np.uint8
    assert len(p.faces) == 1 and p.index == 0
    eyes = np.abs(p.landmarks_aligned[:2] - p.target_points[:2])
    print("astronaut: aligned - target (px):\n", np.round(p.landmarks_aligned - p.target_points, 2))
    # A similarity cannot fit all 5 points of a real face (her smile is wider than the template's
    # mouth): the eyes land within a few px, nose and mouth within ~20 px.
    assert eyes.max() < 6.0
    assert np.abs(p.landmarks_aligned - p.target_points).max() < 25.0
    # Independent of the transform maths: detect the face again in the crop itself.
    again = detect_faces(p.image)
    assert len(again) == 1
    redetected = again[0].landmarks
    print("astronaut: re-detected in the crop - mapped (px):\n", np.round(redetected - p.landmarks_aligned, 2))
    # the crop is the photo enlarged 3.3x, so MTCNN's ~1 px noise becomes ~3 px here
    assert np.abs(redetected - p.landmarks_aligned).max() < 8.0
    assert np.abs(redetected[:2] - FFHQ_POINTS_512[:2]).max() < 10.0
    summary = p.summary()
    json.dumps(summary)
    assert summary["faces_found"] == 1 and summary["crop_size"] == 512


def test_file_inputs_rgba_png_and_grayscale_jpeg(astronaut, astronaut_aligned, tmp_path):
    rgba = np.concatenate([astronaut, np.full(astronaut.shape[:2] + (1,), 200, np.uint8)], axis=2)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "astro.png")
    Image.fromarray(astronaut).convert("L").save(tmp_path / "astro_gray.jpg", quality=95)
    from_png = align_photo(tmp_path / "astro.png")
    # the alpha channel is dropped: the same pixels, the same crop
    np.testing.assert_array_equal(from_png.image, astronaut_aligned.image)
    assert from_png.name.endswith("astro.png")
    gray = align_photo(str(tmp_path / "astro_gray.jpg"))
    assert gray.image.shape == (512, 512, 3)
    assert np.abs(gray.landmarks_source - astronaut_aligned.landmarks_source).max() < 3.0
    assert (gray.image[..., 0] == gray.image[..., 1]).all()  # still gray, as three channels


def test_huge_photo_is_downscaled_for_detection_not_refused(astronaut, astronaut_aligned):
    canvas = np.full((4000, 6000, 3), 90, np.uint8)
    face = np.asarray(Image.fromarray(astronaut).resize((1536, 1536), Image.BICUBIC))
    canvas[1200:2736, 3000:4536] = face
    p = align_photo(canvas)
    assert p.source_size == (6000, 4000) and p.image.shape == (512, 512, 3)
    # detected on a 1280-px copy, mapped back to full-resolution coordinates
    expected = (astronaut_aligned.landmarks_source + 0.5) * 3 - 0.5 + np.array([3000, 1200])
    print("6000x4000: landmark error vs 3x astronaut (px):", np.round(np.abs(p.landmarks_source - expected).max(), 2))
    assert np.abs(p.landmarks_source - expected).max() < 10.0  # ~3 astronaut px at 3x
    assert np.abs(p.landmarks_aligned[:2] - p.target_points[:2]).max() < 6.0
    # the crop shows the same face, framed the same way, as the crop of the small photo (for
    # scale: shifting that crop by 10 px alone gives a mean |d| of 18, by 20 px 29)
    diff = np.abs(p.image.astype(np.float64) - astronaut_aligned.image.astype(np.float64)).mean()
    print("6000x4000 crop vs 512 crop: mean |d| =", round(diff, 2))
    assert diff < 20.0


def test_face_missed_at_detection_size_is_looked_for_again_larger(astronaut, astronaut_aligned):
    from guide_fast.identity.align import detect_faces

    canvas = np.full((1024, 1024, 3), 90, np.uint8)
    canvas[300:812, 400:912] = astronaut
    # at 100 px the face is ~8 px: MTCNN misses it; align_photo retries at twice the size
    assert detect_faces(canvas, max_side=100) == []
    p = align_photo(canvas, max_side=100)
    expected = astronaut_aligned.landmarks_source + np.array([400, 300])
    assert np.abs(p.landmarks_source - expected).max() < 10.0  # detected on a 5x smaller copy


def test_several_faces_largest_index_and_strict(astronaut):
    two = np.concatenate([astronaut, astronaut[:, ::-1]], axis=1)  # 1024x512, second one mirrored
    second = align_photo(two, index=1)
    assert len(second.faces) == 2 and second.index == 1 and second.face is second.faces[1]
    assert np.abs(second.landmarks_aligned[:2] - second.target_points[:2]).max() < 8.0
    with pytest.raises(MultipleFacesError) as info:
        align_photo(two, strict=True, name="two.png")
    msg = str(info.value)
    print(msg)
    assert msg.startswith("two.png: 2 faces found") and "[0] box" in msg and "[1] box" in msg
    assert len(info.value.faces) == 2
    with pytest.raises(InputError, match="face index 5 out of range"):
        align_photo(two, index=5, name="two.png")


def _bad_photos(folder):
    """The bad inputs of the issue, as files: (path, error class, message fragment)."""
    Image.fromarray(np.full((256, 256, 3), 128, np.uint8)).save(folder / "gray.png")
    Image.fromarray(np.full((10, 10, 3), 128, np.uint8)).save(folder / "tiny10.png")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(folder / "whole.png")
    data = (folder / "whole.png").read_bytes()
    (folder / "corrupt.png").write_bytes(data[: len(data) // 2])
    (folder / "notes.jpg").write_text("not an image\n")
    return [
        (folder / "gray.png", NoFaceError, "no face found in the 256x256 image"),
        (folder / "tiny10.png", NoFaceError, "smaller than MTCNN's 20-pixel minimum"),
        (folder / "corrupt.png", InputError, "cannot be read as an image"),
        (folder / "notes.jpg", InputError, "cannot be read as an image"),
        (folder / "missing.png", InputError, "photo not found"),
    ]


def test_bad_photos_raise_clear_input_errors(tmp_path):
    _needs_detector()
    for path, cls, fragment in _bad_photos(tmp_path):
        with pytest.raises(cls) as info:
            align_photo(path)
        assert str(info.value).startswith(str(path)), str(info.value)
        assert fragment in str(info.value)


def test_cli_refuses_bad_photos_with_exit_code_2_and_writes_nothing(tmp_path, astronaut, capsys):
    from guide_fast.cli import main

    cases = _bad_photos(tmp_path)
    two = tmp_path / "two.png"
    Image.fromarray(np.concatenate([astronaut, astronaut], axis=1)).save(two)
    cases.append((two, MultipleFacesError, "2 faces found (strict mode"))
    for path, _, fragment in cases:
        out = tmp_path / f"out_{path.stem}"
        rc = main(["unlearn", "--generator", "tiny", "--random-nets", "--image", str(path), "--out", str(out),
                   "--iters", "2", "--invert-steps", "5", "--strict", "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 2, err
        assert fragment in err and str(path) in err and "Traceback" not in err
        assert not out.exists()
        assert not list(tmp_path.glob(f".out_{path.stem}*"))  # no staging folder either


def test_others_folder_is_listed(tmp_path):
    with pytest.raises(InputError, match="not a folder"):
        list_photos(tmp_path / "nope")
    with pytest.raises(InputError, match="no photos found"):
        list_photos(tmp_path)
    for name in ("b.jpg", "a.PNG", "c.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in list_photos(tmp_path)] == ["a.PNG", "b.jpg"]


# ----------------------------------------------------------------- inversion (tiny generator)

@pytest.fixture(scope="module")
def nets():
    return IdentityLoss(SmallFaceNet()).eval(), LPIPS.random(0).eval()


@pytest.fixture(scope="module")
def known(tiny_generator, tmp_path_factory):
    """A known latent (mapped from a seed) rendered frontally, saved as a uint8 PNG."""
    gen = tiny_generator
    z = torch.randn(1, gen.config.z_dim, generator=torch.Generator().manual_seed(5))
    w_true = gen.mapping(z, cameras.frontal_label(1))
    draws = make_render_draws(1, gen.neural_rendering_resolution ** 2, gen.render_options, None,
                              torch.Generator().manual_seed(3))
    with torch.no_grad():
        img = gen.synthesis(w_true, cameras.pose_label(0.0, 0.0), noise_mode="const", render_draws=draws)["image"]
    path = tmp_path_factory.mktemp("known") / "render.png"
    save_image(path, to_uint8(img[0]))
    return w_true, path


# LPIPS at 32 px keeps the VGG trunk cheap on the CPU (the default is 256).
FAST = dict(align=False, lpips_resolution=32)


def test_round_trip_recovers_the_render_of_a_known_latent(tiny_generator, nets, known, tmp_path):
    id_loss, lpips = nets
    w_true, path = known
    gen = tiny_generator
    [r] = invert_images(gen, [path], id_loss=id_loss, lpips=lpips, steps=15, **FAST)
    assert isinstance(r, InversionResult)
    assert gen.renderer_backend == "reference"  # restored (it is switched for the run)
    assert r.w_plus.shape == (1, gen.num_ws, gen.config.w_dim) and torch.isfinite(r.w_plus).all()
    start, end = r.start_quality, r.quality
    print(f"round trip (15 steps): MSE {start['mse']:.4f} -> {end['mse']:.4f}, "
          f"LPIPS {start['lpips']:.4f} -> {end['lpips']:.4f}, "
          f"ID sim {start['identity_similarity']:.4f} -> {end['identity_similarity']:.4f}")
    # Stated bounds: starting from w_avg the render is far from the photo (MSE ~0.23 in [-1, 1]
    # units); 15 Adam steps must cut the MSE at least 4x and LPIPS at least 2x, and reach
    # absolute MSE < 0.05 / LPIPS < 0.04 (60 steps reach MSE 0.003, LPIPS 0.003).
    assert start["mse"] > 0.1
    assert end["mse"] < 0.25 * start["mse"] and end["mse"] < 0.05
    assert end["lpips"] < 0.5 * start["lpips"] and end["lpips"] < 0.04
    assert end["identity_similarity"] > start["identity_similarity"]
    # the recovered latent really renders the photo: re-render it independently
    draws = make_render_draws(1, gen.neural_rendering_resolution ** 2, gen.render_options, None,
                              torch.Generator().manual_seed(11))
    with torch.no_grad():
        again = gen.synthesis(r.w_plus, r.camera.label, noise_mode="const", render_draws=draws)["image"].clamp(-1, 1)
    photo = torch.from_numpy(np.array(Image.open(path))).permute(2, 0, 1)[None].float() / 127.5 - 1
    assert float((again - photo).square().mean()) < 0.05
    # the camera: frontal, GUIDE's intrinsics, not refined
    assert r.camera.yaw == 0.0 and r.camera.pitch == 0.0 and not r.camera.refined
    torch.testing.assert_close(r.camera.label, cameras.pose_label(0.0, 0.0))
    # the loss went down and the summary is JSON; the images are written
    assert r.losses[-1]["total"] < r.losses[0]["total"]
    summary = json.loads(json.dumps(r.summary()))
    assert summary["quality"] == pytest.approx(end) and summary["start"] == "w_avg"
    assert len(summary["camera"]["label"]) == 25
    paths = r.save_images(tmp_path, prefix="identity0_")
    assert [p.name for p in paths] == ["identity0_aligned.png", "identity0_reconstruction.png"]
    assert np.asarray(Image.open(paths[1])).shape == (64, 64, 3)
    np.testing.assert_array_equal(np.asarray(Image.open(paths[0])), np.asarray(Image.open(path)))


def test_encoder_start_uses_goae_offsets(tiny_generator, nets, known):
    id_loss, lpips = nets
    w_true, path = known
    gen = tiny_generator
    seen = []

    def encoder(img):
        seen.append(img)
        offsets = (w_true - gen.w_avg).expand(img.shape[0], -1, -1)
        return offsets, None  # GOAE's encoder returns (w, features)

    [r] = invert_images(gen, path, id_loss=id_loss, lpips=lpips, steps=0, encoder=encoder, **FAST)
    assert seen[0].shape == (1, 3, 256, 256)
    assert -1.0 <= float(seen[0].min()) and float(seen[0].max()) <= 1.0
    torch.testing.assert_close(r.w_plus, w_true)  # offsets + w_avg, untouched with steps=0
    # only uint8 rounding and the renderer's random draws separate the render from the photo
    assert r.quality["mse"] < 1e-3 and r.start_quality == r.quality
    assert r.summary()["start"] == "encoder"

    def bad_encoder(img):
        return torch.zeros(img.shape[0], 3, gen.config.w_dim)

    with pytest.raises(InputError, match="expected W\\+ offsets of shape"):
        invert_images(gen, path, id_loss=id_loss, lpips=lpips, steps=0, encoder=bad_encoder, **FAST)


def test_refine_camera_keeps_yaw_and_pitch_bounded(tiny_generator, nets, known, capsys):
    id_loss, lpips = nets
    _, path = known
    capsys.readouterr()
    [r] = invert_images(tiny_generator, path, id_loss=id_loss, lpips=lpips, steps=3, refine_camera=True,
                        yaw=0.3, pitch=-0.2, camera_lr=0.5, progress=True, **FAST)
    assert "inverting" in capsys.readouterr().err  # the tqdm bar, when asked for
    assert r.camera.refined
    assert abs(r.camera.yaw) < 0.6 and abs(r.camera.pitch) < 0.6
    assert abs(r.camera.yaw - 0.3) > 1e-4 or abs(r.camera.pitch + 0.2) > 1e-4  # it was learnt
    torch.testing.assert_close(r.camera.label, cameras.pose_label(r.camera.yaw, r.camera.pitch))


def test_invert_images_refuses_bad_arguments(tiny_generator, nets, known):
    id_loss, lpips = nets
    _, path = known
    kw = dict(id_loss=id_loss, lpips=lpips)
    with pytest.raises(InputError, match="unknown inversion option"):
        invert_images(tiny_generator, path, steps=1, learning_rate=0.1, **kw)
    with pytest.raises(InputError, match="needs an encoder"):
        invert_images(tiny_generator, path, steps=0, **kw)
    with pytest.raises(InputError, match="outside"):
        invert_images(tiny_generator, path, steps=1, yaw=0.7, **kw)
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="bf16"):
            invert_images(tiny_generator, path, steps=1, precision="bf16", **kw)
    with pytest.raises(InputError, match="Triton renderer"):  # the fused kernel has no ray gradients
        invert_images(tiny_generator, path, steps=1, refine_camera=True, renderer="triton", **kw)
    rect = path.parent / "rect.png"
    Image.fromarray(np.zeros((40, 64, 3), np.uint8)).save(rect)
    with pytest.raises(InputError, match="must be square"):
        invert_images(tiny_generator, rect, steps=1, align=False, **kw)


def test_non_finite_loss_is_reported_with_the_photo_name(tiny_generator, nets, known):
    _, lpips = nets

    class NaNFaceNet(SmallFaceNet):
        def forward(self, x):
            return super().forward(x) * float("nan")

    _, path = known
    with pytest.raises(InversionError, match="render.png: the inversion loss became non-finite at step 1"):
        invert_images(tiny_generator, path, id_loss=IdentityLoss(NaNFaceNet()), lpips=lpips, steps=2, **FAST)


def test_unlearner_images_path_end_to_end(tiny_generator, nets, known, tmp_path):
    from guide_fast.unlearn.config import UnlearnConfig
    from guide_fast.unlearn.engine import Unlearner

    id_loss, lpips = nets
    _, path = known
    cfg = UnlearnConfig(iterations=1, use_adjacency=False, use_global=False, seed=0)
    result = Unlearner(tiny_generator, id_loss, lpips, cfg).unlearn(images=[str(path)], steps=2, render=False, **FAST)
    assert len(result.inversion) == 1
    torch.testing.assert_close(result.w_source, result.inversion[0].w_plus)
    out = result.save(tmp_path / "run")
    report = json.loads((out / "report.json").read_text())
    assert report["inversion"][0]["quality"].keys() == {"lpips", "identity_similarity", "mse"}
    assert (out / "identity0_aligned.png").exists() and (out / "identity0_reconstruction.png").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fast path (bf16 + Triton renderer) needs CUDA")
def test_fast_path_inverts_as_well_as_the_reference_on_cuda(nets, known):
    from guide_fast.eg3d.generator import build_generator

    id_loss, lpips = (copy.deepcopy(m).cuda() for m in nets)  # the module-scoped nets stay on the CPU
    _, path = known
    gen = build_generator("tiny", seed=0, device="cuda")
    quality = {}
    for name, opts in (("reference", dict(renderer="reference", precision="fp32")), ("fast", {})):
        [r] = invert_images(gen, path, id_loss=id_loss, lpips=lpips, steps=30, **FAST, **opts)
        quality[name] = (r.start_quality, r.quality, r.timings)
        assert gen.renderer_backend == "reference"
    print(quality)
    assert quality["fast"][2]["renderer"] == "triton" and quality["fast"][2]["precision"] == "bf16"
    for start, end, _ in quality.values():
        assert end["mse"] < 0.25 * start["mse"]
    assert quality["fast"][1]["mse"] < 2 * quality["reference"][1]["mse"] + 0.01


def test_other_photos_are_inverted_and_feed_id_others(known, tmp_path):
    """unlearn --others DIR inverts the other photos (saved as w_others); evaluate --run then
    reports ID_others from them (docs/guide.md §4.3)."""
    import json
    import shutil

    from guide_fast.checkpoints import load_latents
    from guide_fast.cli import main

    _, photo = known  # (w_true, path of the rendered PNG)
    others = tmp_path / "others"
    others.mkdir()
    for name in ("a.png", "b.png"):
        shutil.copy(photo, others / name)
    out = tmp_path / "run"
    assert main(["unlearn", "--generator", "tiny", "--random-nets", "--image", str(photo), "--pre-aligned",
                 "--others", str(others), "--iters", "2", "--invert-steps", "2", "--out", str(out),
                 "--no-progress"]) == 0
    w_others = load_latents(out / "latents.safetensors", key="w_others")
    assert w_others.shape[0] == 2
    report = json.loads((out / "report.json").read_text())
    assert report["others"]["photos"] == ["a.png", "b.png"] and len(report["others"]["inverted"]) == 2
    assert main(["evaluate", "--run", str(out), "--random-nets", "--samples", "0", "--preserve", "0",
                 "--align", "crop", "--quiet"]) == 0
    result = json.loads((out / "eval.json").read_text())
    assert result["id_others"] is not None
