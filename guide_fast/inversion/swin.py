"""The Swin Transformer V2 backbone of the GOAE encoder, in plain PyTorch (docs/formats.md §5).

Parameter and buffer names, their order and the arithmetic follow the backbone GUIDE ships in
`goae/swin_transformer.py` (the Microsoft Swin-V2 code as GOAE modified it), so that
`encoder_FFHQ.pt` loads strictly under the prefix `swin_model.`. What it computes:

* patch embedding: 4x4 / stride-4 convolution, then LayerNorm;
* four stages of blocks with **post-norm** residuals (x + DropPath(LN(attn(x))), then
  x + DropPath(LN(mlp(x)))), a 2x2 patch merging (concatenation order (0,0), (1,0), (0,1), (1,1)
  in (row, column), then Linear, then LayerNorm) at the end of the first three stages, and a final
  LayerNorm;
* scaled-cosine window attention: cosine similarity times exp(min(logit_scale, log 100)), plus a
  continuous relative position bias 16 * sigmoid(cpb_mlp(log-spaced coordinates)), with the
  coordinates normalised by the *pretrained* window size minus one; shifted windows every second
  block with the -100 attention mask;
* a stage whose resolution is not larger than the window uses one window of the whole map and no
  shift (at 256² input: the 16x16 stage keeps window 16, the 8x8 stage uses window 8).

timm's Swin-V2 is not used: it puts the patch merging at the start of the next stage (other key
names) and does not expose the stage inputs GOAE reads. Dropout rates inside the backbone are 0
in GOAE's configuration (only drop-path is active), so no dropout modules are built here.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError

# exp(logit_scale) is capped at 1 / 0.01. The official code builds this cap as a float32 tensor
# (torch.log of a float32 100); a Python float rounded to float32 is the same number.
LOGIT_SCALE_MAX = float(torch.log(torch.tensor(1.0 / 0.01, dtype=torch.float32)))


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth per sample: keep each sample's branch with probability 1 - rate and scale
    the kept ones by 1 / (1 - rate). The draw is one bernoulli_ on a [B, 1, ...] tensor taken from
    the tensor's device generator (the same draw timm's DropPath makes, so a seeded run consumes
    the random stream the way the official encoder does)."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    if keep > 0.0:
        mask.div_(keep)
    return x * mask


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """[B, H, W, C] -> [B * H/window * W/window, window, window, C], windows in row-major order."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, window, window, c)


def window_reverse(windows: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    """Inverse of window_partition."""
    b = int(windows.shape[0] / (h * w / window / window))
    x = windows.view(b, h // window, w // window, window, window, -1)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(b, h, w, -1)


def relative_coords_table(window: int, pretrained_window: int) -> torch.Tensor:
    """[1, 2w-1, 2w-1, 2] log-spaced relative coordinates fed to the position-bias MLP:
    d / (pretrained - 1) (or / (w - 1) without a pretrained size) * 8, then
    sign(t) * log2(|t| + 1) / log2(8)."""
    d = torch.arange(-(window - 1), window, dtype=torch.float32)
    table = torch.stack(torch.meshgrid(d, d, indexing="ij"), dim=-1).unsqueeze(0)
    norm = pretrained_window if pretrained_window > 0 else window
    table[..., 0] /= norm - 1
    table[..., 1] /= norm - 1
    table *= 8
    return torch.sign(table) * torch.log2(torch.abs(table) + 1.0) / math.log2(8)


def relative_position_index(window: int) -> torch.Tensor:
    """[w*w, w*w] int64: index into the (2w-1)^2 table for each (query, key) pair of a window."""
    ij = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = (ij[:, :, None] - ij[:, None, :]).permute(1, 2, 0).contiguous()
    rel[:, :, 0] += window - 1
    rel[:, :, 1] += window - 1
    rel[:, :, 0] *= 2 * window - 1
    return rel.sum(-1)


def shifted_window_mask(h: int, w: int, window: int, shift: int) -> torch.Tensor:
    """[nW, w*w, w*w] additive mask (0 / -100) so a shifted window attends only within the
    regions that were adjacent before the cyclic shift."""
    regions = torch.zeros((1, h, w, 1))
    cuts = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    label = 0
    for rows in cuts:
        for cols in cuts:
            regions[:, rows, cols, :] = label
            label += 1
    flat = window_partition(regions, window).view(-1, window * window)
    diff = flat.unsqueeze(1) - flat.unsqueeze(2)
    return diff.masked_fill(diff != 0, float(-100.0)).masked_fill(diff == 0, float(0.0))


class WindowAttention(nn.Module):
    """Scaled-cosine multi-head attention inside one window with the continuous position bias."""

    def __init__(self, dim: int, window: int, num_heads: int, pretrained_window: int):
        super().__init__()
        self.dim, self.window, self.num_heads = dim, window, num_heads
        self.pretrained_window = pretrained_window  # what relative_coords_table was made from (goae.check_state)
        # Registration order fixes the state_dict order of the official file: own parameters
        # (logit_scale, q_bias, v_bias), own buffers, then the children cpb_mlp, qkv, proj.
        self.logit_scale = nn.Parameter(torch.log(10 * torch.ones((num_heads, 1, 1))))
        self.cpb_mlp = nn.Sequential(nn.Linear(2, 512, bias=True), nn.ReLU(inplace=True),
                                     nn.Linear(512, num_heads, bias=False))
        self.register_buffer("relative_coords_table", relative_coords_table(window, pretrained_window))
        self.register_buffer("relative_position_index", relative_position_index(window))
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def position_bias(self) -> torch.Tensor:
        """[heads, N, N] = 16 * sigmoid(cpb_mlp(table)) gathered per (query, key) pair."""
        n = self.window * self.window
        table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)
        bias = table[self.relative_position_index.view(-1)].view(n, n, -1)
        return 16 * torch.sigmoid(bias.permute(2, 0, 1).contiguous())

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [windows*B, N, C]; mask [nW, N, N] or None."""
        bw, n, c = x.shape
        # The key projection has no bias: q and v biases around a zero block.
        bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias, requires_grad=False), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias).reshape(bw, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(self.logit_scale, max=LOGIT_SCALE_MAX).exp()
        attn = attn + self.position_bias().unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            attn = attn.view(bw // nw, nw, self.num_heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, n, n)
        attn = torch.softmax(attn, dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(bw, n, c)
        return self.proj(out)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwinBlock(nn.Module):
    """(Shifted-)window attention and MLP, each a post-norm residual with drop-path."""

    def __init__(self, dim: int, resolution: tuple, num_heads: int, window: int, shift: int,
                 mlp_ratio: float, drop_path_rate: float, pretrained_window: int):
        super().__init__()
        self.dim, self.resolution = dim, tuple(resolution)
        if min(self.resolution) <= window:  # the whole map is one window; nothing to shift
            shift, window = 0, min(self.resolution)
        if not 0 <= shift < window:
            raise ValueError(f"shift {shift} must lie in [0, window {window})")
        self.window, self.shift, self.drop_path_rate = window, shift, float(drop_path_rate)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, num_heads, pretrained_window)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        if shift > 0:
            self.register_buffer("attn_mask", shifted_window_mask(*self.resolution, window, shift))
        else:
            self.attn_mask = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self.resolution
        b, length, c = x.shape
        if length != h * w:
            raise ValueError(f"expected {h * w} tokens, got {length}")
        shortcut = x
        x = x.view(b, h, w, c)
        if self.shift > 0:
            x = torch.roll(x, shifts=(-self.shift, -self.shift), dims=(1, 2))
        windows = window_partition(x, self.window).view(-1, self.window * self.window, c)
        windows = self.attn(windows, mask=self.attn_mask).view(-1, self.window, self.window, c)
        x = window_reverse(windows, self.window, h, w)
        if self.shift > 0:
            x = torch.roll(x, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x.view(b, h * w, c)
        x = shortcut + drop_path(self.norm1(x), self.drop_path_rate, self.training)
        return x + drop_path(self.norm2(self.mlp(x)), self.drop_path_rate, self.training)


class PatchMerging(nn.Module):
    """2x2 neighbours concatenated ((0,0), (1,0), (0,1), (1,1)), Linear 4C -> 2C, then LayerNorm."""

    def __init__(self, resolution: tuple, dim: int):
        super().__init__()
        self.resolution = tuple(resolution)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(2 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self.resolution
        b, _, c = x.shape
        x = x.view(b, h, w, c)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.norm(self.reduction(x.view(b, -1, 4 * c)))


class SwinStage(nn.Module):
    def __init__(self, dim: int, resolution: tuple, depth: int, num_heads: int, window: int,
                 mlp_ratio: float, drop_path_rates: list, pretrained_window: int, downsample: bool):
        super().__init__()
        self.blocks = nn.ModuleList([
            SwinBlock(dim, resolution, num_heads, window, 0 if i % 2 == 0 else window // 2,
                      mlp_ratio, drop_path_rates[i], pretrained_window)
            for i in range(depth)])
        self.downsample = PatchMerging(resolution, dim) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.downsample(x) if self.downsample is not None else x


class PatchEmbed(nn.Module):
    def __init__(self, img_size: int, patch_size: int, embed_dim: int):
        super().__init__()
        self.img_size = img_size
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class SwinV2Backbone(nn.Module):
    """Swin-V2 returning what GOAE's heads read (at 256² and embed 128, shapes in brackets):

    * base  = final LayerNorm(stage-4 output), transposed  [B, 1024, 64]
    * query = stage-4 input, transposed                    [B, 1024, 64]
    * coarse = stage-3 input                               [B, 256, 512]
    * mid    = stage-2 input                               [B, 1024, 256]
    * fine   = stage-1 input (patch embedding)             [B, 4096, 128]
    """

    def __init__(self, img_size: int = 256, patch_size: int = 4, embed_dim: int = 128,
                 depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size: int = 16,
                 pretrained_window_sizes=(12, 12, 12, 6), mlp_ratio: float = 4.0, drop_path_rate: float = 0.2):
        super().__init__()
        if len(depths) != 4 or len(num_heads) != 4 or len(pretrained_window_sizes) != 4:
            raise InputError("GOAE's heads read four stages: depths, num_heads and pretrained_window_sizes need 4 entries")
        self.patch_embed = PatchEmbed(img_size, patch_size, embed_dim)
        grid = img_size // patch_size
        # Stochastic depth rises linearly from 0 over all blocks (float32 linspace, as the original).
        rates = [r.item() for r in torch.linspace(0, drop_path_rate, sum(depths), device="cpu")]
        self.layers = nn.ModuleList()
        for i in range(4):
            start = sum(depths[:i])
            self.layers.append(SwinStage(
                embed_dim * 2 ** i, (grid // 2 ** i, grid // 2 ** i), depths[i], num_heads[i], window_size,
                mlp_ratio, rates[start:start + depths[i]], pretrained_window_sizes[i], downsample=i < 3))
        self.norm = nn.LayerNorm(embed_dim * 8)

    def forward(self, x: torch.Tensor):
        """x [B, 3, S, S] -> (base, query, coarse, mid, fine) as in the class docstring."""
        x = self.patch_embed(x)
        fine = x
        x = self.layers[0](x)
        mid = x
        x = self.layers[1](x)
        coarse = x
        x = self.layers[2](x)
        query = x
        x = self.layers[3](x)
        base = self.norm(x).transpose(1, 2)
        return base, query.transpose(1, 2), coarse, mid, fine
