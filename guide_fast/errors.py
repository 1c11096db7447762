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


def describe_state_mismatch(state, expected, optional=(), limit: int = 4) -> str:
    """'' if the tensors of `state` match `expected` (name -> tensor) in names and shapes, else a
    one-line account: missing, unexpected and wrong-shape keys, the first few of each."""
    optional = set(optional)
    missing = sorted(set(expected) - set(state) - optional)
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(f"{k}: file {list(state[k].shape)} vs expected {list(expected[k].shape)}"
                   for k in set(expected) & set(state) if tuple(state[k].shape) != tuple(expected[k].shape))

    def first(items):
        more = f", ... ({len(items)} in all)" if len(items) > limit else ""
        return ", ".join(items[:limit]) + more

    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s): {first(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {first(unexpected)}")
    if wrong:
        parts.append(f"{len(wrong)} shape mismatch(es): {first(wrong)}")
    return "; ".join(parts)
