"""GUIDE's own MTCNN (guide_fast.identity.guide_mtcnn): the weight permutation that turns
facenet-pytorch's bundled files into GUIDE's nets, the detector on scikit-image's astronaut
against the reference outputs of GUIDE's code (tests/data/keylists/mtcnn_astronaut.json), and how
it differs from facenet-pytorch's detector."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from guide_fast.identity import guide_mtcnn as gm

pytest.importorskip("facenet_pytorch")
REFERENCE = json.loads((Path(__file__).parent / "data" / "keylists" / "mtcnn_astronaut.json").read_text())


@pytest.fixture(scope="module")
def astronaut():
    skimage_data = pytest.importorskip("skimage.data")
    return skimage_data.astronaut()


@pytest.fixture(scope="module")
def guide_faces(astronaut):
    return gm.detect([astronaut])[0]


# ------------------------------------------------------------------------ weight permutation
@pytest.mark.parametrize("c,h,w", [(5, 3, 4), (64, 3, 3), (128, 3, 3)])
def test_dense_permutation_gives_the_same_output_on_a_random_feature_map(c, h, w):
    g = torch.Generator().manual_seed(c)
    fmap = torch.randn(2, c, h, w, generator=g, dtype=torch.float64)  # PyTorch layout [N, C, H, W]
    facenet_flat = fmap.permute(0, 3, 2, 1).reshape(2, -1)            # facenet-pytorch: (W, H, C)
    guide_flat = fmap.transpose(3, 2).reshape(2, -1)                   # GUIDE / pSp: (C, W, H)
    weight = torch.randn(7, c * h * w, generator=g, dtype=torch.float64)
    permuted = gm.facenet_to_guide_dense(weight, c, h, w)
    torch.testing.assert_close(guide_flat @ permuted.T, facenet_flat @ weight.T, rtol=0, atol=1e-10)
    # the permutation is needed: the unpermuted weight reads the wrong features
    assert not torch.allclose(guide_flat @ weight.T, facenet_flat @ weight.T, atol=1e-3)
    # nor the one for a (C, H, W) flatten: H and W are told apart even on the square 3x3 maps
    chw = weight.reshape(7, w, h, c).permute(0, 3, 2, 1).reshape(7, -1)
    assert not torch.allclose(guide_flat @ chw.T, facenet_flat @ weight.T, atol=1e-3)


def test_guide_nets_built_from_facenet_files_compute_facenets_functions():
    from facenet_pytorch.models.mtcnn import ONet, PNet, RNet

    pnet, rnet, onet = gm.load_nets("cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        x = torch.randn(3, 3, 24, 24, generator=g)
        ours, theirs = rnet(x), RNet().eval()(x)
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        x = torch.randn(3, 3, 48, 48, generator=g)
        ours, theirs = onet(x), ONet().eval()(x)
        for a, b in zip(ours, (theirs[1], theirs[0], theirs[2])):  # (landmarks, offsets, probs)
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        x = torch.randn(1, 3, 40, 52, generator=g)
        offsets, probs = pnet(x)
        f_offsets, f_probs = PNet().eval()(x)
        torch.testing.assert_close(offsets, f_offsets, rtol=1e-5, atol=1e-5)
        # GUIDE's P-Net quirk: the softmax runs over the map's width, not over the two classes
        torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))
        assert not torch.allclose(probs, f_probs, atol=1e-3)


def test_state_dict_names_are_guides():
    names = set(gm.load_nets("cpu")[2].state_dict())
    assert {"features.conv5.weight", "features.prelu5.weight", "conv6_3.weight", "features.conv1.weight"} <= names


# ------------------------------------------------------------------------ astronaut
def test_pyramid_is_guides():
    scales = gm.pyramid_scales(512, 512)
    assert scales[0] == pytest.approx(0.6) and scales[1] == pytest.approx(0.6 * 0.707)
    assert 512 * 0.6 * 0.707 ** (len(scales) - 1) > 12 >= 512 * 0.6 * 0.707 ** len(scales)


def test_astronaut_boxes_and_landmarks_match_guides_code(guide_faces):
    ref = REFERENCE["guide"]
    assert len(guide_faces) == 2  # the face, and the low-score false positive GUIDE's 0.35 lets through
    np.testing.assert_allclose(guide_faces.boxes, np.array(ref["boxes"]), rtol=0, atol=1e-3)
    np.testing.assert_allclose(guide_faces.landmarks, np.array(ref["landmarks"], np.float32), rtol=0, atol=1e-3)
    assert guide_faces.landmarks.dtype == np.float32
    assert guide_faces.boxes[0, 4] > guide_faces.boxes[1, 4]  # highest O-Net score first


def test_alignment_matrix_and_mapped_points_match_guides_code(guide_faces):
    ref = REFERENCE["guide"]
    lm = np.array(ref["landmarks"], np.float32)[0]
    points = np.stack([lm[:5], lm[5:]], axis=1)
    matrix = gm.similarity_matrix(points)
    np.testing.assert_allclose(matrix, np.array(ref["tfm"]), rtol=0, atol=1e-9)
    mapped = points.astype(np.float64) @ matrix[:, :2].T + matrix[:, 2]
    np.testing.assert_allclose(mapped, np.array(ref["mapped"]), rtol=0, atol=1e-9)
    # from our own detection: the same up to the nets' float rounding
    np.testing.assert_allclose(gm.similarity_matrix(guide_faces.points(0)), np.array(ref["tfm"]), atol=1e-3)


def test_aligned_crop_is_the_cv2_warp_of_the_face(astronaut):
    cv2 = pytest.importorskip("cv2")
    aligned = gm.align([astronaut])[0]
    assert aligned.image.shape == (112, 112, 3) and aligned.image.dtype == np.uint8
    expected = cv2.warpAffine(astronaut, np.array(REFERENCE["guide"]["tfm"]), (112, 112))
    # the matrix differs from the reference by ~1e-5: at most a level or two on a few pixels
    diff = np.abs(aligned.image.astype(int) - expected.astype(int))
    assert diff.max() <= 2 and (diff > 0).mean() < 0.05


def test_guide_and_facenet_detectors_differ_on_the_astronaut(astronaut, guide_faces):
    from guide_fast.identity.align import detect_faces

    facenet = detect_faces(astronaut)  # facenet-pytorch, its default thresholds
    assert len(facenet) == 1
    np.testing.assert_allclose(facenet[0].landmarks, np.array(REFERENCE["facenet"]["points"][0]), atol=1e-3)
    gap = np.abs(facenet[0].landmarks - guide_faces.points(0))
    assert 0.5 < gap.max() < 2.0  # docs/face_models.md §5.3: up to 1.3 px per coordinate


def test_no_face_and_bad_input():
    assert len(gm.detect([np.zeros((64, 64, 3), np.uint8)])[0]) == 0
    assert gm.align([np.full((30, 30, 3), 128, np.uint8)]) == [None]
    from guide_fast.errors import InputError

    with pytest.raises(InputError, match="uint8"):
        gm.detect([np.zeros((64, 64, 3), np.float32)])


# ------------------------------------------------------------------------ box utilities
def test_nms_union_and_min_modes():
    boxes = np.array([[0, 0, 9, 9, 0.9], [5, 0, 14, 9, 0.8], [0, 0, 4, 4, 0.7], [40, 40, 49, 49, 0.6]], float)
    # IoU with box 0 (+1 pixel areas of 100): box 1 50/150, box 2 (inside it) 25/100
    assert [int(i) for i in gm.nms(boxes, 0.5)] == [0, 1, 2, 3]
    assert [int(i) for i in gm.nms(boxes, 0.3)] == [0, 2, 3]
    # 'min' mode divides by the smaller area: 50/100 and 25/25
    assert [int(i) for i in gm.nms(boxes, 0.3, mode="min")] == [0, 3]


def test_cutting_crops_clips_the_boxes_in_place_as_guides_code():
    image = np.arange(20 * 30 * 3, dtype=np.uint8).reshape(20, 30, 3)
    boxes = np.array([[-4.0, -2.0, 9.0, 11.0, 0.9], [25.0, 15.0, 34.0, 24.0, 0.8]])
    crops = gm.cut_boxes(boxes, image, 24)
    assert crops.shape == (2, 3, 24, 24)
    np.testing.assert_array_equal(boxes[:, :4], [[0, 0, 9, 11], [25, 15, 29, 19]])
