"""The GOAE encoder: one forward pass from an aligned face photo to W+ offsets (docs/guide.md §3.3,
file format docs/formats.md §5).

GUIDE inverts a photo with GOAE's encoder (`encoder_FFHQ.pt`):
`GOAEncoder(swin_config, mlp_layer=2, stage_list=[10000, 20000, 30000])`, `w, _ = encoder(img)`,
`w_u = w + w_avg`. This module is that encoder written here in plain PyTorch with the official
parameter names, so the official file loads strictly:

    enc = load_encoder("encoder_FFHQ.pt", device="cuda")            # eval mode (default)
    w = enc(preprocess_for_goae(photos).to("cuda"))                  # [B, 14, 512] offsets
    w_u = w + w_avg                                                   # W+ latent of the photo

What the heads compute (names as in the file; B = batch, at 256² input):

* `swin_model` (guide_fast.inversion.swin): base [B,1024,64], query [B,1024,64],
  coarse [B,256,512], mid [B,1024,256], fine [B,4096,128];
* base latent: `mapper_base_channel(mapper_base_spatial(base)^T + max_tokens(base))`, one [512]
  vector repeated over the 14 W+ rows;
* queries (coarse 3 rows, mid 3, fine 7): `mapper_query_channel_X(mapper_query_spatial_X(query)^T
  + max_tokens(query))`;
* keys/values: `kv_coarse = mapper_coarse_channel(coarse)`,
  `kv_mid = mapper_mid_channel(mid) + mapper_coarse_to_mid_spatial(kv_coarse^T)^T`,
  `kv_fine = mapper_fine_channel(fine) + mapper_mid_to_fine_spatial(kv_mid^T)^T`;
* `cross_att_X`: post-norm cross-attention (nn.MultiheadAttention 512/4 heads, dropout 0.1;
  parameter-free LayerNorm; ReLU FFN 512-1024-512 with dropout 0.1);
* w = base repeated 14 times + [0, coarse (rows 1-3), mid (4-6), fine (7-13)].

The official forward returns `(w, w_base)`; `enc(images)` returns `w` (what GUIDE uses) and
`enc(images, return_base=True)` both. GOAE's training stages (`stage_list`, `set_stage`) only
matter while training GOAE: GUIDE never calls `set_stage`, so the encoder always runs its last
stage (full W+), the only one built here.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError, InputError
from .swin import SwinV2Backbone, relative_position_index

if TYPE_CHECKING:
    import PIL.Image

W_DIM = 512
NUM_WS = 14
# W+ rows written by each cross-attention head (row 0 is the base latent alone).
ROWS = {"coarse": 3, "mid": 3, "fine": 7}
INPUT_SIZE = 256
MODES = ("eval", "official")


@dataclasses.dataclass(frozen=True)
class GOAEConfig:
    """Architecture of the encoder. The defaults are GOAE's `swinv2.yaml` as GUIDE reads it
    (Swin-V2, 256² input, embed 128, depths [2, 2, 18, 2], heads [4, 8, 16, 32], window 16,
    pretrained window sizes [12, 12, 12, 6], drop-path 0.2) with `mlp_layer=2`. A smaller one
    (see `tiny()`) keeps the head wiring and serves the tests."""

    img_size: int = INPUT_SIZE
    embed_dim: int = 128
    depths: tuple = (2, 2, 18, 2)
    num_heads: tuple = (4, 8, 16, 32)
    window_size: int = 16
    pretrained_window_sizes: tuple = (12, 12, 12, 6)
    drop_path_rate: float = 0.2
    mlp_layer: int = 2

    def __post_init__(self):
        for name in ("depths", "num_heads", "pretrained_window_sizes"):
            value = tuple(int(v) for v in getattr(self, name))
            if len(value) != 4:
                raise InputError(f"GOAEConfig.{name} needs 4 entries (one per Swin stage), got {list(value)}")
            object.__setattr__(self, name, value)
        if self.img_size % 32 or self.img_size < 64:
            raise InputError(f"GOAEConfig.img_size must be a multiple of 32 and at least 64, got {self.img_size}")
        dims = [self.embed_dim * 2 ** i for i in range(4)]
        bad = [(d, h) for d, h in zip(dims, self.num_heads) if h < 1 or d % h]
        if bad:
            raise InputError(f"GOAEConfig: stage width {bad[0][0]} is not divisible by {bad[0][1]} heads")
        if self.mlp_layer < 1:
            raise InputError(f"GOAEConfig.mlp_layer must be >= 1, got {self.mlp_layer}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise InputError(f"GOAEConfig.drop_path_rate must lie in [0, 1), got {self.drop_path_rate}")

    @classmethod
    def tiny(cls) -> "GOAEConfig":
        """Embed 32, depths [2, 2, 2, 2]: the same wiring (windows, shifts, heads) at ~1/10 the
        parameters, for CPU tests."""
        return cls(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(2, 4, 8, 16))

    def describe(self) -> str:
        return (f"GOAEncoder(Swin-V2 {self.img_size}², embed {self.embed_dim}, depths {list(self.depths)}, "
                f"heads {list(self.num_heads)}, window {self.window_size}, pretrained windows "
                f"{list(self.pretrained_window_sizes)}, mlp_layer={self.mlp_layer})")


OFFICIAL = GOAEConfig()


def _mlp(in_dim: int, out_dim: int, layers: int) -> nn.Sequential:
    """GOAE's get_mlp_layer: (layers - 1) x [Linear(in, in), LeakyReLU] then Linear(in, out)."""
    mods = []
    for _ in range(layers - 1):
        mods += [nn.Linear(in_dim, in_dim), nn.LeakyReLU()]
    mods.append(nn.Linear(in_dim, out_dim))
    return nn.Sequential(*mods)


class CrossAttention(nn.Module):
    """W+ queries attend to a feature map: x = LN(q + Drop(MHA(q, kv, kv)));
    x = x + Drop(W2 Drop(ReLU(W1 x))). The LayerNorm has no parameters; the official module also
    builds an unused `norm1` (no parameters either), left out."""

    def __init__(self, d_model: int = W_DIM, nhead: int = 4, dim_feedforward: int = 1024, dropout: float = 0.1):
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm2 = nn.LayerNorm(d_model, elementwise_affine=False)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def forward(self, query: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        # Same call as the official one (need_weights left at its default): same kernels, and in
        # train mode the same dropout draws in the same order.
        attended = self.multihead_attn(query=query, key=memory, value=memory)[0]
        x = self.norm2(query + self.dropout2(attended))
        return x + self.dropout3(self.linear2(self.dropout(F.relu(self.linear1(x)))))


class GOAEncoder(nn.Module):
    """GOAE's encoder (stage 3, full W+). forward(images [B, 3, S, S] in [-1, 1]) -> W+ offsets
    [B, 14, 512] from w_avg (S = config.img_size, 256 for the official file).

    Mode: `.eval()` is deterministic (GOAE's own inference); `.train()` is what GUIDE runs
    (it never calls eval): drop-path and the cross-attention dropout draw random numbers.
    See `load_encoder` and `forward(seed=...)`.
    """

    #: (num_ws, w_dim) of the latents it writes, fixed by its head whatever the config
    output_layout = (NUM_WS, W_DIM)

    def __init__(self, config: GOAEConfig = OFFICIAL):
        super().__init__()
        if not isinstance(config, GOAEConfig):
            raise InputError(f"config must be a GOAEConfig, got {type(config).__name__}")
        self.config = c = config
        grid = c.img_size // 4
        tokens = [(grid // 2 ** i) ** 2 for i in range(4)]   # fine, mid, coarse, last stage
        widths = [c.embed_dim * 2 ** i for i in range(4)]
        n = c.mlp_layer
        self.swin_model = SwinV2Backbone(
            img_size=c.img_size, embed_dim=c.embed_dim, depths=c.depths, num_heads=c.num_heads,
            window_size=c.window_size, pretrained_window_sizes=c.pretrained_window_sizes,
            drop_path_rate=c.drop_path_rate)
        self.mapper_base_spatial = _mlp(tokens[3], 1, n)
        self.mapper_base_channel = _mlp(widths[3], W_DIM, n)
        self.mapper_query_spatial_coarse = _mlp(tokens[3], ROWS["coarse"], n)
        self.mapper_query_channel_coarse = _mlp(widths[3], W_DIM, n)
        self.mapper_query_spatial_mid = _mlp(tokens[3], ROWS["mid"], n)
        self.mapper_query_channel_mid = _mlp(widths[3], W_DIM, n)
        self.mapper_query_spatial_fine = _mlp(tokens[3], ROWS["fine"], n)
        self.mapper_query_channel_fine = _mlp(widths[3], W_DIM, n)
        self.mapper_coarse_channel = nn.Sequential(nn.Linear(widths[2], W_DIM), nn.LeakyReLU())
        self.mapper_mid_channel = nn.Sequential(nn.Linear(widths[1], W_DIM), nn.LeakyReLU())
        # The fine branch's hidden width is a literal 256 in GOAE (not tied to the embedding).
        self.mapper_fine_channel = nn.Sequential(nn.Linear(widths[0], 256), nn.LeakyReLU(),
                                                 nn.Linear(256, W_DIM), nn.LeakyReLU())
        # Spatial maps between token grids: coarse -> mid (256 -> 512 -> 1024 tokens at 256²),
        # mid -> fine (1024 -> 2048 -> 4096).
        self.mapper_coarse_to_mid_spatial = nn.Sequential(
            nn.Linear(tokens[2], 2 * tokens[2]), nn.LeakyReLU(), nn.Linear(2 * tokens[2], tokens[1]), nn.LeakyReLU())
        self.mapper_mid_to_fine_spatial = nn.Sequential(
            nn.Linear(tokens[1], 2 * tokens[1]), nn.LeakyReLU(), nn.Linear(2 * tokens[1], tokens[0]), nn.LeakyReLU())
        self.cross_att_coarse = CrossAttention()
        self.cross_att_mid = CrossAttention()
        self.cross_att_fine = CrossAttention()

    @property
    def mode(self) -> str:
        """'official' while in train mode (GUIDE's stochastic encoder), else 'eval'."""
        return "official" if self.training else "eval"

    def _check_images(self, images) -> torch.Tensor:
        s = self.config.img_size
        if not torch.is_tensor(images):
            raise InputError(f"GOAE input must be a torch.Tensor [B, 3, {s}, {s}], got {type(images).__name__} "
                             "(use preprocess_for_goae for PIL images or uint8 arrays)")
        if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != (s, s) or images.shape[0] < 1:
            raise InputError(f"GOAE input must be [B, 3, {s}, {s}] in [-1, 1], got {list(images.shape)}")
        if not images.is_floating_point():
            raise InputError(f"GOAE input must be a float tensor in [-1, 1], got {images.dtype} "
                             "(preprocess_for_goae converts uint8 images)")
        if not bool(torch.isfinite(images).all()):
            raise InputError("GOAE input contains non-finite values (NaN or inf)")
        p = self.swin_model.patch_embed.proj.weight
        return images.to(device=p.device, dtype=p.dtype)

    def forward(self, images: torch.Tensor, *, seed: int | None = None, return_base: bool = False):
        """W+ offsets [B, 14, 512] (add w_avg for the latent); with return_base=True the official
        pair (w, w_base), w_base [B, 14, 512] being the base latent repeated. Runs under
        torch.no_grad (the encoder is inference-only here).

        seed: in train ('official') mode, draw the dropout / drop-path randomness from the
        images' device generator freshly seeded with `seed` (its state is restored afterwards), so
        the same seed gives the same w. seed=None draws from the device's global generator as it
        stands, in the official order of draws (the same ops as GUIDE's encoder): GUIDE's
        `unlearn.py --seed S` reaches its encoder after torch.manual_seed(S) and four camera-sampler
        draws, and `guide_fast.seeds.official_rng(S, device)` around `enc(x)` sets up exactly that
        state, so on CUDA with the same batch the draws are GUIDE's. Ignored in eval mode.
        """
        x = self._check_images(images)
        with torch.no_grad():  # inference only (GUIDE encodes under no_grad too)
            if seed is None or not self.training:
                return self._encode(x, return_base)
            with _seeded(x.device, seed):
                return self._encode(x, return_base)

    def _encode(self, x: torch.Tensor, return_base: bool):
        b = x.shape[0]
        base, query, coarse, mid, fine = self.swin_model(x)

        base_max = base.amax(dim=-1, keepdim=True).transpose(1, 2)            # [B, 1, C]
        ws_base = self.mapper_base_channel(self.mapper_base_spatial(base).transpose(1, 2) + base_max)
        ws_base = ws_base.repeat(1, NUM_WS, 1)

        query_max = query.amax(dim=-1, keepdim=True).transpose(1, 2)
        q_coarse = self.mapper_query_channel_coarse(self.mapper_query_spatial_coarse(query).transpose(1, 2) + query_max)
        q_mid = self.mapper_query_channel_mid(self.mapper_query_spatial_mid(query).transpose(1, 2) + query_max)
        q_fine = self.mapper_query_channel_fine(self.mapper_query_spatial_fine(query).transpose(1, 2) + query_max)

        kv_coarse = self.mapper_coarse_channel(coarse)
        kv_mid = self.mapper_mid_channel(mid) + self.mapper_coarse_to_mid_spatial(kv_coarse.transpose(1, 2)).transpose(1, 2)
        kv_fine = self.mapper_fine_channel(fine) + self.mapper_mid_to_fine_spatial(kv_mid.transpose(1, 2)).transpose(1, 2)

        # Coarse, mid, fine in this order: in train mode it is the official order of dropout draws.
        ws_coarse = self.cross_att_coarse(q_coarse, kv_coarse)
        ws_mid = self.cross_att_mid(q_mid, kv_mid)
        ws_fine = self.cross_att_fine(q_fine, kv_fine)
        zero = torch.zeros(b, 1, W_DIM, device=x.device, dtype=ws_base.dtype)
        w = ws_base + torch.cat([zero, ws_coarse, ws_mid, ws_fine], dim=1)
        return (w, ws_base) if return_base else w


@contextlib.contextmanager
def _seeded(device: torch.device, seed: int):
    """Seed the generator of `device` for the duration of the block, then restore its state."""
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or not 0 <= int(seed) < 2 ** 63:
        raise InputError(f"seed must be an integer in [0, 2**63), got {seed!r}")
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        with torch.random.fork_rng(devices=[index], device_type="cuda"):
            torch.cuda.default_generators[index].manual_seed(int(seed))
            yield
    else:
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(int(seed))
            yield


# ---------------------------------------------------------------------------------------------
# The weight file
# ---------------------------------------------------------------------------------------------

def expected_state(config: GOAEConfig = OFFICIAL) -> "OrderedDict[str, torch.Tensor]":
    """Key -> meta tensor (shape, dtype) of the encoder's state_dict, in the official order. At the
    official configuration: 545 entries (50 buffers), 111,218,822 parameters."""
    with torch.device("meta"):
        return OrderedDict(GOAEncoder(config).state_dict())


def _index_keys(state) -> list:
    return [k for k in state if k.endswith("relative_position_index")]


def check_state(state, path, config: GOAEConfig = OFFICIAL) -> "OrderedDict[str, torch.Tensor]":
    """Validate a GOAE state_dict against `config`; returns it ready to load (floating tensors as
    float32). Raises a one-line CheckpointError naming the file and the first differences."""
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"GOAE encoder {path}: holds a {type(state).__name__}, expected the encoder's "
                              "state_dict (a dict of tensors, as GUIDE loads it)")
    bad = [k for k, v in state.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if bad:
        raise CheckpointError(f"GOAE encoder {path}: entries that are not tensors: {[str(k) for k in bad[:4]]}")
    from ..checkpoints import describe_mismatch

    with torch.device("meta"):  # one meta model gives the expected entries and the derived buffers' parameters
        model = GOAEncoder(config)
    expected = OrderedDict(model.state_dict())
    diff = describe_mismatch(state, expected)
    if diff:
        hint = ""
        if not any(k.startswith("swin_model.") for k in state):
            hint = " (no swin_model.* keys at all: not a GOAE encoder file; GOAE's is encoder_FFHQ.pt)"
        raise CheckpointError(f"GOAE encoder {path}: not the state_dict of {config.describe()}{hint}: {diff}")
    out = OrderedDict()
    for key, value in state.items():
        want = expected[key]
        if want.dtype.is_floating_point:
            if not value.is_floating_point():
                raise CheckpointError(f"GOAE encoder {path}: {key} is {value.dtype}, expected a floating tensor")
            if not bool(torch.isfinite(value).all()):
                raise CheckpointError(f"GOAE encoder {path}: non-finite values (NaN / inf) in {key}")
            value = value.to(torch.float32)
            if not bool(torch.isfinite(value).all()):  # a finite float64 1e300 is inf in float32
                raise CheckpointError(f"GOAE encoder {path}: values beyond float32's range in {key}")
        out[key] = value
    # The position index buffers gather the bias table: wrong entries would index out of range or
    # scramble the bias, so they must be exactly the ones the window size implies.
    for key in _index_keys(out):
        window = int(round(out[key].shape[0] ** 0.5))
        if out[key].is_floating_point() or out[key].is_complex() or not torch.equal(
                out[key].long(), relative_position_index(window)):
            raise CheckpointError(f"GOAE encoder {path}: {key} is not the relative position index of a "
                                  f"{window}x{window} window")
        out[key] = out[key].long()
    _check_derived_buffers(out, path, model)
    return out


def _check_derived_buffers(state, path, model: "GOAEncoder") -> None:
    """The relative-coordinate tables and the shifted-window masks follow from the architecture
    (window, pretrained window, shift, resolution) as the index buffers do: a file's own values
    would silently change every attention (a mask of 1e4 instead of -100, a skewed bias table).
    Compared with what the configuration computes, to fp16 rounding (a half-precision file is fine)."""
    from .swin import WindowAttention, relative_coords_table, shifted_window_mask

    for name, m in model.named_modules():  # `model` on the meta device: only its attributes are read
        if isinstance(m, WindowAttention):
            key, want = f"{name}.relative_coords_table", relative_coords_table(m.window, m.pretrained_window)
        elif getattr(m, "shift", 0) and getattr(m, "attn_mask", None) is not None:
            key, want = f"{name}.attn_mask", shifted_window_mask(*m.resolution, m.window, m.shift)
        else:
            continue
        got = state.get(key)
        if got is not None and (tuple(got.shape) != tuple(want.shape)
                                or not torch.allclose(got.float(), want, rtol=1e-3, atol=2e-3)):
            raise CheckpointError(f"GOAE encoder {path}: {key} is not the buffer this architecture computes "
                                  f"(max difference {float((got.float() - want).abs().max()):.3g})")


def read_encoder_state(path) -> "OrderedDict[str, torch.Tensor]":
    """The file as a state_dict, read on the CPU by checkpoints.files (code in the file never
    runs). The official file is a bare state_dict; a {'state_dict': ...} wrapper or a
    DataParallel `module.` prefix is taken off."""
    from ..checkpoints import read_torch_file

    obj = read_torch_file(Path(path), "GOAE encoder weights")
    if isinstance(obj, dict) and not any(torch.is_tensor(v) for v in obj.values()):
        for key in ("state_dict", "encoder", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if isinstance(obj, dict) and obj and all(isinstance(k, str) and k.startswith("module.") for k in obj):
        obj = OrderedDict((k[len("module."):], v) for k, v in obj.items())
    return obj


def load_encoder(path: "str | os.PathLike", device: "torch.device | str" = "cpu", mode: str = "eval", *,
                 config: GOAEConfig = OFFICIAL) -> GOAEncoder:
    """Load `encoder_FFHQ.pt` (or any state_dict of `config`) into a GOAEncoder on `device`.

    Every key and shape is checked against the architecture and non-finite weights are refused:
    any problem is one CheckpointError line naming the file and the first differences.

    mode:
      * "eval" (default): module.eval(): drop-path and dropout off, so a photo always gives the
        same latent (bit-identical across calls). This is how GOAE's own inference runs the encoder
        and what a service wants: the inversion depends only on the photo.
      * "official": module.train(), reproducing GUIDE's unlearn.py, which never calls eval():
        drop-path (rising to 0.2 in the last blocks) and the cross-attention dropout (0.1) stay
        active, so w depends on the random stream. Deterministic under a seed: `enc(x, seed=S)`
        (a fresh generator seeded with S), or the global generator as set beforehand
        (torch.manual_seed(S); `guide_fast.seeds.official_rng(S, device)` for the state GUIDE's
        run with --seed S has at its encoder). The two modes' outputs differ by ~0.4-0.7 mean
        absolute value on random weights, so use "official" only to reproduce GUIDE's numbers.
    """
    if mode not in MODES:
        raise InputError(f"unknown GOAE mode {mode!r}; expected one of {', '.join(repr(m) for m in MODES)}")
    from ..commands._common import resolve_device

    dev = resolve_device(device, flag="device")
    state = check_state(read_encoder_state(path), path, config)
    with torch.device("meta"):
        enc = GOAEncoder(config)
    # Fresh storage on the device, then a copy, as the official load_state_dict does. Not
    # assign=True: tensors read from the file are views at arbitrary offsets of one buffer, and
    # unaligned weights make the CPU kernels round differently (1e-6), breaking bit-parity.
    enc = enc.to_empty(device=dev)
    enc.load_state_dict(state, strict=True)
    # Parameters keep requires_grad=True, as in GUIDE: PyTorch's matmul chooses how to fold a
    # batched product partly by that flag, so freezing them changes the rounding (~1e-7) even
    # under no_grad. The forward runs under no_grad, so no graph is ever built.
    return enc.train() if mode == "official" else enc.eval()


def describe_file(path, config: GOAEConfig = OFFICIAL) -> str:
    """One line for the weight manifest: what the file holds (raises CheckpointError if invalid)."""
    state = check_state(read_encoder_state(path), path, config)
    n_buffers = sum(k.endswith(("relative_coords_table", "relative_position_index", "attn_mask")) for k in state)
    n_params = sum(v.numel() for k, v in state.items()
                   if not k.endswith(("relative_coords_table", "relative_position_index", "attn_mask")))
    return (f"{config.describe()}: {len(state)} tensors ({n_buffers} buffers), {n_params:,} parameters, "
            "keys and shapes as GUIDE's goae.GOAEncoder")


# ---------------------------------------------------------------------------------------------
# Preprocessing
# ---------------------------------------------------------------------------------------------

def _to_pil(image, index: int):
    from PIL import Image

    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise InputError(f"image {index}: uint8 array expected, got {image.dtype} "
                             "(GOAE's preprocessing starts from 8-bit pixels)")
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[:, :, 0]
        if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
            raise InputError(f"image {index}: array of shape {list(image.shape)}, expected [H, W], [H, W, 3] or [H, W, 4]")
        if min(image.shape[:2]) < 1:
            raise InputError(f"image {index}: empty array of shape {list(image.shape)}")
        return Image.fromarray(np.ascontiguousarray(image))
    raise InputError(f"image {index}: a PIL image or a uint8 array expected, got {type(image).__name__}")


def preprocess_for_goae(images: "PIL.Image.Image | np.ndarray | Sequence[PIL.Image.Image | np.ndarray]",
                        size: int = INPUT_SIZE) -> torch.Tensor:
    """GUIDE's encoder input: each image converted to RGB, resized to size x size with PIL's
    bicubic filter (Image.resize's default for RGB), then pixels / 127.5 - 1 in float32.

    images: one PIL image, one uint8 array ([H, W], [H, W, 3|4] or a batch [B, H, W, 3]), or a
    sequence of those. Returns a CPU tensor [B, 3, size, size] in [-1, 1]. The photo should be
    aligned the way EG3D's FFHQ crops are (docs/guide.md §3.3); this function does not align.
    """
    from PIL import Image

    if isinstance(images, np.ndarray) and images.ndim == 4:
        items: Sequence = list(images)
    elif isinstance(images, (Image.Image, np.ndarray)):
        items = [images]
    elif isinstance(images, (list, tuple)):
        items = list(images)
    else:
        raise InputError(f"preprocess_for_goae takes PIL images or uint8 arrays, got {type(images).__name__}")
    if not items:
        raise InputError("preprocess_for_goae: no images given")
    out = []
    for i, item in enumerate(items):
        img = _to_pil(item, i).convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
        pixels = torch.from_numpy(np.array(img).transpose(2, 0, 1).copy())
        out.append(pixels.to(torch.float32) / 127.5 - 1)
    return torch.stack(out, dim=0)
