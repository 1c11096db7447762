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


@pytest.fixture
def generator_pair():
    """The (G_u, G_s) pair of an unlearning run, set up as the engine does it:
    `generator_pair(source, plan=None) -> (g_u, g_s)` (guide_fast.unlearn.engine.generator_pair:
    deep copies in train mode, G_s frozen, only G_u's backbone.synthesis trainable, the plan's
    operators applied when a plan is given)."""
    from guide_fast.unlearn.engine import generator_pair

    return generator_pair
