import pytest

from reference_data import DATA, KEYLISTS, SHARED


@pytest.mark.parametrize("rel", sorted(str(p.relative_to(KEYLISTS)) for p in KEYLISTS.iterdir()))
def test_keylist_copies_equal_shared_reference(rel):
    shared = SHARED / "keylists" / rel
    if not shared.exists():
        pytest.skip(f"{shared} not present beside the repository")
    assert (KEYLISTS / rel).read_bytes() == shared.read_bytes()


def test_state_dict_listing_copy_equals_shared_reference():
    shared = SHARED / "eg3d_ffhq512-128_state_dict.txt"
    if not shared.exists():
        pytest.skip(f"{shared} not present beside the repository")
    assert (DATA / "eg3d_ffhq512-128_state_dict.txt").read_bytes() == shared.read_bytes()
