"""Test set-up. Without a GPU the Triton kernels run in the interpreter: the variable must be
set before any @triton.jit function is defined, i.e. before guide_fast.kernels is imported."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def tiny_generator():
    from guide_fast.eg3d.generator import build_generator

    return build_generator("tiny", seed=0)
