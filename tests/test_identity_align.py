"""MTCNN detection and 5-point alignment (docs/face_models.md §2.3, §5).

The similarity-transform and warp tests need nothing but numpy / torch; the detector tests need
facenet-pytorch (bundled MTCNN weights) and scikit-image (the astronaut photo) and are skipped
with a reason where those are absent (e.g. the GPU machine).
"""
import numpy as np
import pytest
import torch

from guide_fast.errors import InputError
from guide_fast.identity import (
    REFERENCE_POINTS_112,
    MultipleFacesError,
    NoFaceError,
    align_face,
    align_faces,
    apply_transform,
    detect_faces,
    similarity_transform,
    warp_affine,
)
from guide_fast.identity.preprocess import to_rgb_uint8

# keylists/mtcnn_astronaut.json: facenet-pytorch detect() on skimage's astronaut (defaults) and
# GUIDE's own detector + alignment matrix on the same image.
FACENET_BOX = [181.05140686035156, 62.156131744384766, 267.747314453125, 172.05015563964844]
FACENET_POINTS = np.array([
    [205.0109100341797, 101.72744750976562], [246.7625732421875, 103.71408081054688],
    [224.67135620117188, 128.96499633789062], [201.7161102294922, 139.2461700439453],
    [245.26548767089844, 141.8570098876953],
])
GUIDE_LANDMARKS = np.array([  # (x1..x5, y1..y5) of GUIDE's detector, first face
    203.78684997558594, 246.7932891845703, 225.1802215576172, 202.53831481933594, 245.3847198486328,
    101.38731384277344, 103.78724670410156, 128.53302001953125, 140.3426971435547, 141.50852966308594,
]).reshape(2, 5).T
GUIDE_TFM = np.array([
    [0.916983351064091, 0.04045894526784063, -155.03460620147777],
    [-0.040458945267840586, 0.916983351064091, -31.8980453439323],
])
GUIDE_MAPPED = np.array([
    [35.93656617354836, 52.82743244953292], [75.46985366901993, 53.288135756921406],
    [56.652218377861004, 76.85403981656552], [36.36777394290297, 88.59938478622114],
    [75.7043823618161, 87.93491344075635],
])


# ----------------------------------------------------------------- transform and warp (no MTCNN)

def test_similarity_transform_reproduces_guide_matrix():
    m = similarity_transform(GUIDE_LANDMARKS, REFERENCE_POINTS_112)
    # The landmarks in the json are float32, so agreement is to ~1e-5 relative.
    np.testing.assert_allclose(m, GUIDE_TFM, rtol=0, atol=2e-5)
    np.testing.assert_allclose(apply_transform(m, GUIDE_LANDMARKS), GUIDE_MAPPED, rtol=0, atol=2e-5)


def test_similarity_transform_is_exact_on_a_similarity_and_picks_reflection():
    rng = np.random.default_rng(0)
    angle, scale, t = 0.3, 1.7, np.array([12.0, -5.0])
    rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    src = rng.uniform(0, 100, size=(5, 2))
    dst = src @ rot.T + t
    m = similarity_transform(src, dst)
    np.testing.assert_allclose(m[:, :2], rot, atol=1e-9)
    np.testing.assert_allclose(m[:, 2], t, atol=1e-8)
    mirrored = dst * np.array([-1.0, 1.0])  # only a reflected similarity maps src onto this
    mr = similarity_transform(src, mirrored)
    assert np.linalg.det(mr[:, :2]) < 0
    np.testing.assert_allclose(apply_transform(mr, src), mirrored, atol=1e-8)
    mn = similarity_transform(src, mirrored, reflective=False)
    assert np.linalg.det(mn[:, :2]) > 0
    with pytest.raises(InputError):
        similarity_transform(src[:1], dst[:1])


def test_warp_affine_follows_cv2_convention():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, size=(40, 50, 3), dtype=np.uint8)
    # A pure integer translation copies pixels: out(x, y) = img(x + 3, y + 2).
    shift = np.array([[1.0, 0.0, -3.0], [0.0, 1.0, -2.0]])
    out = warp_affine(img, shift, (20, 10))
    assert out.shape == (10, 20, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, img[2:12, 3:23])
    # Half-pixel translation: the mean of two neighbours, rounded; outside the image: black.
    half = np.array([[1.0, 0.0, -0.5], [0.0, 1.0, 0.0]])
    out = warp_affine(img, half, (50, 40)).astype(int)
    expect = np.floor((img[:, :-1].astype(int) + img[:, 1:].astype(int)) / 2.0 + 0.5)
    assert np.abs(out[:, :-1] - expect).max() <= 1
    far = np.array([[1.0, 0.0, 500.0], [0.0, 1.0, 0.0]])
    assert warp_affine(img, far, (8, 8)).max() == 0


def test_warp_affine_matches_skimage_warp():
    skt = pytest.importorskip("skimage.transform", reason="scikit-image is not installed")
    rng = np.random.default_rng(2)
    img = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    m = similarity_transform(GUIDE_LANDMARKS / 4, REFERENCE_POINTS_112)  # scale ~3.7: no prefilter
    ours = warp_affine(img, m, (112, 112)).astype(float)
    tform = skt.AffineTransform(matrix=np.vstack([m, [0, 0, 1]]))
    ref = skt.warp(img, tform.inverse, output_shape=(112, 112), order=1, mode="constant", cval=0,
                   preserve_range=True)
    assert np.abs(ours - np.round(ref)).max() <= 1


def test_to_rgb_uint8_handles_modes():
    from PIL import Image

    rgb = np.random.default_rng(3).integers(0, 256, size=(9, 7, 3), dtype=np.uint8)
    np.testing.assert_array_equal(to_rgb_uint8(rgb), rgb)
    rgba = np.concatenate([rgb, np.full((9, 7, 1), 17, np.uint8)], -1)
    np.testing.assert_array_equal(to_rgb_uint8(rgba), rgb)
    np.testing.assert_array_equal(to_rgb_uint8(Image.fromarray(rgba, "RGBA")), rgb)
    gray = rgb[..., 0]
    np.testing.assert_array_equal(to_rgb_uint8(gray), np.repeat(gray[..., None], 3, -1))
    np.testing.assert_array_equal(to_rgb_uint8(Image.fromarray(gray, "L")), np.repeat(gray[..., None], 3, -1))
    np.testing.assert_array_equal(to_rgb_uint8(gray.astype(np.float64) / 255.0), np.repeat(gray[..., None], 3, -1))
    t = torch.from_numpy(rgb).permute(2, 0, 1).float() / 127.5 - 1  # generator convention
    np.testing.assert_array_equal(to_rgb_uint8(t), rgb)
    with pytest.raises(InputError, match="outside"):
        to_rgb_uint8(np.full((4, 4), 3.0))
    with pytest.raises(InputError):
        to_rgb_uint8("face.png")


# ----------------------------------------------------------------------------- MTCNN detection

@pytest.fixture(scope="module")
def astronaut():
    pytest.importorskip("facenet_pytorch", reason="facenet-pytorch (MTCNN weights) is not installed")
    data = pytest.importorskip("skimage.data", reason="scikit-image (astronaut photo) is not installed")
    return data.astronaut()


@pytest.fixture(scope="module")
def aligned_astronaut(astronaut):
    return align_face(astronaut)


def test_astronaut_detection_matches_reference(aligned_astronaut):
    a = aligned_astronaut
    assert len(a.faces) == 1 and a.index == 0
    np.testing.assert_allclose(a.face.box, FACENET_BOX, atol=0.05)
    np.testing.assert_allclose(a.face.landmarks, FACENET_POINTS, atol=0.05)
    assert a.face.prob > 0.999
    # Within ~1.3 px of GUIDE's own detector (docs/face_models.md §5.3).
    assert np.abs(a.face.landmarks - GUIDE_LANDMARKS).max() < 1.5


def test_astronaut_alignment_lands_on_reference_points(astronaut, aligned_astronaut):
    a = aligned_astronaut
    assert a.image.shape == (112, 112, 3) and a.image.dtype == np.uint8
    np.testing.assert_allclose(a.matrix, similarity_transform(FACENET_POINTS, REFERENCE_POINTS_112), atol=1e-3)
    dist = np.linalg.norm(a.landmarks_aligned - REFERENCE_POINTS_112, axis=1)
    # A similarity cannot hit all five points; GUIDE's own alignment misses by 2.6-6.6 px (§5.3).
    assert dist.max() < 8.0 and dist.mean() < 6.0
    assert np.linalg.det(a.matrix[:, :2]) > 0  # upright, not mirrored
    # End to end: warp with the same matrix into a larger canvas (2x, 16 px margin, so MTCNN sees
    # context around the face) and detect again: the landmarks are where the matrix put them, so
    # warp_affine moves pixels the way the matrix says.
    canvas_map = np.array([[2.0, 0.0, 16.0], [0.0, 2.0, 16.0]]) @ np.vstack([a.matrix, [0, 0, 1]])
    canvas = warp_affine(astronaut, canvas_map, (256, 256))
    np.testing.assert_array_equal(canvas.shape, (256, 256, 3))
    again = detect_faces(canvas)
    assert len(again) >= 1
    moved = apply_transform(canvas_map, a.face.landmarks)
    assert np.linalg.norm(again[0].landmarks - moved, axis=1).max() < 5.0
    t = a.tensor()
    assert t.shape == (3, 112, 112) and -1.0 <= float(t.min()) and float(t.max()) <= 1.0


def test_no_face_gives_a_clear_error(astronaut):
    flat = np.full((256, 256, 3), 128, np.uint8)
    assert detect_faces(flat) == []
    with pytest.raises(NoFaceError, match=r"no face found in the 256x256 image"):
        align_face(flat)
    tiny = astronaut[::52, ::52][:10, :10]
    with pytest.raises(NoFaceError, match=r"10x10 image \(the image is smaller"):
        align_face(tiny)
    assert align_faces([flat, tiny]) == [None, None]


def test_grayscale_and_rgba_inputs(astronaut):
    from PIL import Image

    rgba = np.concatenate([astronaut, np.full(astronaut.shape[:2] + (1,), 255, np.uint8)], -1)
    a = align_face(rgba)
    np.testing.assert_allclose(a.face.landmarks, FACENET_POINTS, atol=0.05)
    gray = Image.fromarray(astronaut).convert("L")
    g = align_face(gray)
    assert g.image.shape == (112, 112, 3)
    assert np.abs(g.image[..., 0].astype(int) - g.image[..., 2].astype(int)).max() == 0
    assert np.linalg.norm(g.face.landmarks - FACENET_POINTS, axis=1).max() < 4.0


def test_huge_image_is_downscaled_for_detection(astronaut):
    from PIL import Image

    canvas = np.full((4000, 6000, 3), 90, np.uint8)
    big = np.asarray(Image.fromarray(astronaut).resize((2048, 2048), Image.BILINEAR))
    canvas[1000:3048, 1500:3548] = big
    a = align_face(canvas)
    assert a.source_size == (6000, 4000)
    # Landmarks back in full-resolution coordinates: 4x the astronaut's, offset by the paste.
    expect = (FACENET_POINTS + 0.5) * 4 - 0.5 + np.array([1500, 1000])
    assert np.linalg.norm(a.face.landmarks - expect, axis=1).max() < 4 * 2.0
    dist = np.linalg.norm(a.landmarks_aligned - REFERENCE_POINTS_112, axis=1)
    assert dist.max() < 8.0
    # The crop is a face like the 512 one, not an aliased mess.
    small = align_face(astronaut).image.astype(float)
    assert np.abs(a.image.astype(float) - small).mean() < 12.0


def test_several_faces_largest_index_and_strict(astronaut):
    from PIL import Image

    half = np.asarray(Image.fromarray(astronaut).resize((384, 384), Image.BILINEAR))
    pair = np.full((512, 1024, 3), 60, np.uint8)
    pair[:, :512] = astronaut
    pair[64:448, 600:984] = half[:, ::-1]  # a smaller, mirrored copy on the right
    faces = detect_faces(pair)
    assert len(faces) == 2
    assert faces[0].area > faces[1].area and faces[0].box[0] < 512 < faces[1].box[0]
    a = align_face(pair)
    np.testing.assert_allclose(a.face.landmarks, FACENET_POINTS, atol=1.5)  # other pyramid sizes
    # faces= reuses the detection (the choice logic is what is under test below).
    b = align_face(pair, index=1, faces=faces)
    assert b.face.box[0] > 512 and b.index == 1
    assert np.linalg.norm(b.landmarks_aligned - REFERENCE_POINTS_112, axis=1).max() < 9.0
    with pytest.raises(MultipleFacesError) as err:
        align_face(pair, strict=True, faces=faces)
    assert "2 faces found" in str(err.value) and "[0] box" in str(err.value) and "[1] box" in str(err.value)
    assert len(err.value.faces) == 2
    assert align_face(pair, index=0, strict=True, faces=faces).index == 0  # an explicit choice is fine
    with pytest.raises(InputError, match="face index 5 out of range: 2 face"):
        align_face(pair, index=5, faces=faces)
