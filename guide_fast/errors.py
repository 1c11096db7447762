"""Error types: every user-facing failure is one of these, with a message naming the problem."""


def printable(text: object) -> str:
    """`text` as one line that shows what it holds: control and format characters (newlines,
    carriage returns, terminal escapes, bidirectional overrides) escaped as Python writes them.
    Messages quote names read from files, and a file must not be able to forge a second line of
    output or drive the terminal."""
    import unicodedata

    # repr() of a lone character escapes exactly the non-printable ones ('\n', '\x1b', '\u202e')
    return "".join(repr(ch)[1:-1] if unicodedata.category(ch)[0] == "C" else ch for ch in str(text))


class GuideFastError(Exception):
    """Base class of guide-fast's own errors. Text arguments pass through `printable`: messages
    quote names and values read from untrusted files, and str(error) stays one honest line
    wherever it is printed or logged."""

    def __init__(self, *args):
        super().__init__(*(printable(a) if isinstance(a, str) else a for a in args))


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
