import math

import pytest
import torch

from guide_fast import cameras
from guide_fast.errors import InputError


def test_fov_formula_and_dataset_focal():
    assert cameras.fov_to_focal(18.837) == pytest.approx(4.26339, abs=1e-5)
    assert 2 * math.degrees(math.atan(0.5 / cameras.FFHQ_FOCAL)) == pytest.approx(13.37, abs=0.01)
    k = cameras.fov_to_intrinsics(18.837)
    assert k.shape == (1, 3, 3) and k[0, 0, 2] == 0.5 and k[0, 2, 2] == 1


def test_frontal_pose_matches_spec():
    """docs/eg3d.md §6: h = v = pi/2 looking at (0,0,0.2) -> camera at (0,0,2.7), y down, z towards -Z."""
    c2w = cameras.look_at_pose(math.pi / 2, math.pi / 2, lookat=cameras.EG3D_PIVOT)
    want = torch.tensor([[1.0, 0, 0, 0], [0, -1, 0, 0], [0, 0, -1, 2.7], [0, 0, 0, 1]])
    torch.testing.assert_close(c2w[0], want, atol=1e-5, rtol=0)


def test_yaw_moves_camera_around_y_and_pitch_raises_it():
    c = cameras.pose_label(torch.tensor([0.0, 0.2]), -0.2)
    assert c.shape == (2, 25)
    origins = c[:, :16].reshape(2, 4, 4)[:, :3, 3]
    assert torch.allclose(origins.norm(dim=-1), torch.tensor(2.7))
    assert origins[0, 1] > 0.3, "pitch -0.2 puts the camera above the horizon"
    assert origins[1, 0] != pytest.approx(0.0)


def test_label_shape_errors():
    with pytest.raises(InputError):
        cameras.camera_label(torch.eye(3)[None], torch.eye(3))
    with pytest.raises(InputError):
        cameras.check_label("c", torch.zeros(2, 24))
    with pytest.raises(InputError):
        cameras.fov_to_focal(0)
