"""Error types: every user-facing failure is one of these, with a message naming the problem."""


class GuideFastError(Exception):
    """Base class of guide-fast's own errors."""


class InputError(GuideFastError, ValueError):
    """Bad input from the caller: wrong shape, non-finite values, unknown option."""


class CheckpointError(GuideFastError):
    """A weight file that is missing, corrupt, unsafe or of the wrong kind."""


def check_finite(name: str, tensor) -> None:
    import torch

    if not torch.is_tensor(tensor):
        raise InputError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise InputError(f"{name} contains {bad} non-finite value(s) (NaN or inf)")
