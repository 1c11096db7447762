"""StyleGAN2 building blocks of EG3D: mapping network, synthesis layers and blocks.

Module and parameter names, registration order and initialisation follow the official code
so that `state_dict()` keys, shapes and order equal the official listing exactly
(docs/eg3d.md Appendix A, reference/eg3d_ffhq512-128_state_dict.txt). Runtime gains are applied
in forward, as the checkpoint stores raw tensors (docs/eg3d.md §7.4 table).
"""
from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import nn

from ..errors import InputError
from ..render.reference import decode
from ..render.types import DecoderWeights
from . import ops

NOISE_MODES = ("random", "const", "none")


class RowNoise(Protocol):
    """A per-row noise source the synthesis layers accept in place of a torch.Generator (one
    stream per identity: guide_fast.unlearn.streams.IdentityNoise)."""

    def randn_rows(self, shape: list[int], device: torch.device) -> torch.Tensor: ...


def check_noise_mode(noise_mode: str) -> None:
    """The one check of a noise_mode option (the generator's planes and synthesis use it)."""
    if noise_mode not in NOISE_MODES:
        raise InputError(f"noise_mode must be one of {NOISE_MODES}, got {noise_mode!r}")


class FullyConnectedLayer(nn.Module):
    """docs/eg3d.md §2.1: y = act(x @ (W * lr_mul/sqrt(in))^T + b * lr_mul)."""

    def __init__(self, in_features, out_features, bias=True, activation="linear", lr_multiplier=1.0, bias_init=0.0):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.activation = activation
        self.weight = nn.Parameter(torch.randn([out_features, in_features]) / lr_multiplier)
        self.bias = nn.Parameter(torch.full([out_features], float(bias_init))) if bias else None
        self.weight_gain = lr_multiplier / math.sqrt(in_features)
        self.bias_gain = lr_multiplier

    def effective_weight(self) -> torch.Tensor:
        return self.weight * self.weight_gain

    def effective_bias(self) -> torch.Tensor | None:
        if self.bias is None:
            return None
        return self.bias * self.bias_gain if self.bias_gain != 1 else self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.effective_weight().to(x.dtype)
        b = self.effective_bias()
        if b is not None:
            b = b.to(x.dtype)
        if self.activation == "linear" and b is not None:
            return torch.addmm(b.unsqueeze(0), x, w.t())
        return ops.bias_act(x.matmul(w.t()), b, act=self.activation)


class OSGDecoder(nn.Module):
    """Mean of the 3 planes' features -> FC(C->hidden) -> softplus -> FC(hidden->1+F) (docs/eg3d.md §4.3).

    Parameter names as the official `decoder.net.*`. Both render backends consume its
    `effective_params()`; `forward` runs the reference renderer's `decode` on them."""

    def __init__(self, n_features: int = 32, hidden_dim: int = 64, output_dim: int = 32, lr_multiplier: float = 1.0):
        super().__init__()
        self.hidden_dim = hidden_dim
        self.output_dim = output_dim
        self.net = nn.Sequential(
            FullyConnectedLayer(n_features, hidden_dim, lr_multiplier=lr_multiplier),
            nn.Softplus(),
            FullyConnectedLayer(hidden_dim, 1 + output_dim, lr_multiplier=lr_multiplier),
        )

    @property
    def in_features(self) -> int:
        return self.net[0].in_features

    def effective_params(self) -> DecoderWeights:
        """(W0, b0, W1, b1) with the runtime gains folded in: what both render backends consume."""
        fc0, fc1 = self.net[0], self.net[2]
        return DecoderWeights(fc0.effective_weight(), fc0.effective_bias(), fc1.effective_weight(),
                              fc1.effective_bias())

    def forward(self, sampled_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """sampled_features [N, 3, M, C] -> (rgb [N, M, F], sigma [N, M, 1]); sigma is raw."""
        return decode(sampled_features, self.effective_params())


class MappingNetwork(nn.Module):
    """z, c -> W+ (docs/eg3d.md §2). Conditioning camera labels are embedded with lr_mul 1."""

    def __init__(self, z_dim, c_dim, w_dim, num_ws, num_layers=2, lr_multiplier=0.01, w_avg_beta=0.998):
        super().__init__()
        self.z_dim, self.c_dim, self.w_dim, self.num_ws = z_dim, c_dim, w_dim, num_ws
        self.num_layers = num_layers
        self.w_avg_beta = w_avg_beta
        embed_features = w_dim if c_dim > 0 else 0
        features = [z_dim + embed_features] + [w_dim] * num_layers
        if c_dim > 0:
            self.embed = FullyConnectedLayer(c_dim, embed_features)
        for idx in range(num_layers):
            layer = FullyConnectedLayer(features[idx], features[idx + 1], activation="lrelu", lr_multiplier=lr_multiplier)
            setattr(self, f"fc{idx}", layer)
        self.register_buffer("w_avg", torch.zeros([w_dim]))

    def forward(self, z, c, truncation_psi=1.0, truncation_cutoff=None):
        x = ops.normalize_2nd_moment(z.to(torch.float32)) if self.z_dim > 0 else None
        if self.c_dim > 0:
            y = ops.normalize_2nd_moment(self.embed(c.to(torch.float32)))
            x = torch.cat([x, y], dim=1) if x is not None else y
        for idx in range(self.num_layers):
            x = getattr(self, f"fc{idx}")(x)
        x = x.unsqueeze(1).repeat([1, self.num_ws, 1])
        if truncation_psi != 1:
            cutoff = self.num_ws if truncation_cutoff is None else truncation_cutoff
            x = torch.cat([self.w_avg.lerp(x[:, :cutoff], truncation_psi), x[:, cutoff:]], dim=1)
        return x


class SynthesisLayer(nn.Module):
    """Modulated 3x3 conv + noise + bias + lrelu*sqrt(2) (+ clamp) (docs/eg3d.md §3.2)."""

    def __init__(self, in_channels, out_channels, w_dim, resolution, up=1, use_noise=True, conv_clamp=None):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.resolution = resolution
        self.up = up
        self.use_noise = use_noise
        self.conv_clamp = conv_clamp
        self.padding = 1
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        self.weight = nn.Parameter(torch.randn([out_channels, in_channels, 3, 3]))
        self.register_buffer("resample_filter", ops.setup_filter())
        # up=2 only: fold the FIR into the transposed conv (ops.conv2d_resample); set through
        # TriPlaneGenerator.set_upsample_conv, a plain attribute so the state_dict is unchanged.
        self.fold_resample = False
        if use_noise:
            self.register_buffer("noise_const", torch.randn([resolution, resolution]))
            self.noise_strength = nn.Parameter(torch.zeros([]))
        self.bias = nn.Parameter(torch.zeros([out_channels]))

    def forward(self, x, w, noise_mode="random", fused_modconv=True, generator=None):
        styles = self.affine(w)
        noise = None
        if self.use_noise and noise_mode == "random":
            shape = [x.shape[0], 1, self.resolution, self.resolution]
            # `generator`: a torch.Generator, or a per-row noise source with .randn_rows(shape,
            # device) (one stream per identity: guide_fast.unlearn.streams.IdentityNoise)
            rows = getattr(generator, "randn_rows", None)
            noise = (rows(shape, x.device) if rows is not None
                     else torch.randn(shape, device=x.device, generator=generator)) * self.noise_strength
        elif self.use_noise and noise_mode == "const":
            noise = self.noise_const * self.noise_strength
        x = ops.modulated_conv2d(
            x, self.weight, styles, noise=noise, up=self.up, padding=self.padding,
            resample_filter=self.resample_filter, fused_modconv=fused_modconv, fold_filter=self.fold_resample,
        )
        clamp = self.conv_clamp * 1.0 if self.conv_clamp is not None else None
        return ops.bias_act(x, self.bias.to(x.dtype), act="lrelu", clamp=clamp)


class ToRGBLayer(nn.Module):
    """Modulated 1x1 conv without demodulation, + bias (docs/eg3d.md §3.2)."""

    def __init__(self, in_channels, out_channels, w_dim, conv_clamp=None):
        super().__init__()
        self.conv_clamp = conv_clamp
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        self.weight = nn.Parameter(torch.randn([out_channels, in_channels, 1, 1]))
        self.bias = nn.Parameter(torch.zeros([out_channels]))
        self.weight_gain = 1 / math.sqrt(in_channels)

    def conv(self, x, w, fused_modconv=True):
        """The modulated 1x1 convolution alone, before the bias (SynthesisBlock adds it in its skip path)."""
        styles = self.affine(w) * self.weight_gain
        return ops.modulated_conv2d(x, self.weight, styles, demodulate=False, fused_modconv=fused_modconv)

    def forward(self, x, w, fused_modconv=True):
        x = self.conv(x, w, fused_modconv=fused_modconv)
        return ops.bias_act(x, self.bias.to(x.dtype), clamp=self.conv_clamp)


class SynthesisBlock(nn.Module):
    """One resolution of the StyleGAN2 'skip' generator (docs/eg3d.md §3.1-3.2).

    use_fp16 marks the super-resolution blocks that the official code runs in fp16 on CUDA;
    `precision` in forward decides whether that happens here.
    """

    def __init__(self, in_channels, out_channels, w_dim, resolution, img_channels, is_last,
                 use_fp16=False, conv_clamp=None, use_noise=True):
        super().__init__()
        self.in_channels = in_channels
        self.resolution = resolution
        self.img_channels = img_channels
        self.is_last = is_last
        self.use_fp16 = use_fp16
        self.num_conv = 0
        self.num_torgb = 0
        if in_channels == 0:
            self.const = nn.Parameter(torch.randn([out_channels, resolution, resolution]))
        self.register_buffer("resample_filter", ops.setup_filter())
        # the skip path (ToRGB bias + clamp, upsampled image, sum) as one Triton kernel: set through
        # TriPlaneGenerator.set_skip_path, a plain attribute so the state_dict is unchanged
        self.fused_skip = False
        if in_channels != 0:
            self.conv0 = SynthesisLayer(in_channels, out_channels, w_dim, resolution, up=2,
                                        use_noise=use_noise, conv_clamp=conv_clamp)
            self.num_conv += 1
        self.conv1 = SynthesisLayer(out_channels, out_channels, w_dim, resolution,
                                    use_noise=use_noise, conv_clamp=conv_clamp)
        self.num_conv += 1
        self.torgb = ToRGBLayer(out_channels, img_channels, w_dim, conv_clamp=conv_clamp)
        self.num_torgb += 1

    def forward(self, x, img, ws, noise_mode="random", fused_modconv=None, fp16=False, generator=None):
        """ws: [N, num_conv + num_torgb, w_dim]. fp16: run this block's activations in fp16."""
        w_iter = iter(ws.unbind(dim=1))
        dtype = torch.float16 if (self.use_fp16 and fp16) else torch.float32
        if fused_modconv is None:
            # 'inference_only' (docs/eg3d.md §1.1): grouped conv in eval mode, shared conv in training.
            fused_modconv = not self.training
        if self.in_channels == 0:
            x = self.const.to(dtype).unsqueeze(0).repeat([ws.shape[0], 1, 1, 1])
        else:
            x = x.to(dtype)
            x = self.conv0(x, next(w_iter), noise_mode=noise_mode, fused_modconv=fused_modconv, generator=generator)
        x = self.conv1(x, next(w_iter), noise_mode=noise_mode, fused_modconv=fused_modconv, generator=generator)
        raw = self.torgb.conv(x, next(w_iter), fused_modconv=fused_modconv)
        img = ops.skip_rgb(img, raw, self.torgb.bias, self.resample_filter, clamp=self.torgb.conv_clamp,
                           fused=self.fused_skip)
        return x, img


class SynthesisNetwork(nn.Module):
    """W+ -> tri-plane image [N, 3*C, R, R] (docs/eg3d.md §3). Blocks b4 ... b{R}."""

    def __init__(self, w_dim, img_resolution, img_channels, channel_base=32768, channel_max=512):
        super().__init__()
        self.w_dim = w_dim
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        log2 = int(math.log2(img_resolution))
        if 2 ** log2 != img_resolution or img_resolution < 4:
            raise InputError(f"backbone resolution must be a power of two >= 4, got {img_resolution}")
        self.block_resolutions = [2 ** i for i in range(2, log2 + 1)]
        channels = {res: min(channel_base // res, channel_max) for res in self.block_resolutions}
        self.num_ws = 0
        for res in self.block_resolutions:
            in_ch = channels[res // 2] if res > 4 else 0
            block = SynthesisBlock(in_ch, channels[res], w_dim, res, img_channels, is_last=(res == img_resolution))
            self.num_ws += block.num_conv
            if res == img_resolution:
                self.num_ws += block.num_torgb
            setattr(self, f"b{res}", block)

    def forward(self, ws, noise_mode="random", fused_modconv=None, generator=None):
        ws = ws.to(torch.float32)
        x = img = None
        w_idx = 0
        for res in self.block_resolutions:
            block = getattr(self, f"b{res}")
            # The torgb of block k shares its w with conv0 of block k+1 (docs/eg3d.md §3.1).
            cur_ws = ws.narrow(1, w_idx, block.num_conv + block.num_torgb)
            w_idx += block.num_conv
            x, img = block(x, img, cur_ws, noise_mode=noise_mode, fused_modconv=fused_modconv, generator=generator)
        return img


class Backbone(nn.Module):
    """The StyleGAN2 `Generator` inside EG3D: `.synthesis` (registered first) and `.mapping`."""

    def __init__(self, z_dim, c_dim, w_dim, img_resolution, img_channels, mapping_layers=2,
                 channel_base=32768, channel_max=512):
        super().__init__()
        self.synthesis = SynthesisNetwork(w_dim, img_resolution, img_channels, channel_base, channel_max)
        self.num_ws = self.synthesis.num_ws
        self.mapping = MappingNetwork(z_dim, c_dim, w_dim, self.num_ws, num_layers=mapping_layers)


class SuperResolution(nn.Module):
    """`SuperresolutionHybrid8XDC` (docs/eg3d.md §5), generalised to log2(out/in) blocks.

    Its input resolution is fixed by the architecture, out_resolution / 2**blocks (128 for the
    512 generators), not by the neural rendering resolution: as the official module, a render
    of another size (64 in ffhq512-64, ffhqrebalanced512-64) is resized to it by bilinear
    interpolation with `antialias` = rendering_kwargs["sr_antialias"].
    Every layer uses w[:, -1] (w13 for FFHQ). Blocks are marked fp16 with conv clamp 256;
    whether fp16 is really used is decided per call (official: fp16 on CUDA only).
    """

    def __init__(self, in_channels, render_resolution, out_resolution, block_channels, w_dim, use_fp16=True,
                 antialias: bool = True):
        super().__init__()
        if not block_channels or (out_resolution >> len(block_channels)) << len(block_channels) != out_resolution:
            raise InputError("super-resolution needs one block per factor of two of its output resolution")
        self.in_resolution = out_resolution >> len(block_channels)
        self.render_resolution = render_resolution
        self.out_resolution = out_resolution
        self.antialias = bool(antialias)
        self.num_blocks = len(block_channels)
        clamp = 256 if use_fp16 else None
        ch_in = in_channels
        res = self.in_resolution
        for i, ch in enumerate(block_channels):
            res *= 2
            block = SynthesisBlock(ch_in, ch, w_dim, res, img_channels=3, is_last=(i == len(block_channels) - 1),
                                   use_fp16=use_fp16, conv_clamp=clamp)
            setattr(self, f"block{i}", block)
            ch_in = ch

    def forward(self, rgb, x, ws, noise_mode="none", fused_modconv=None, fp16=False, generator=None):
        w_last = ws[:, -1:, :].repeat(1, 3, 1)
        if x.shape[-1] != self.in_resolution:
            size = (self.in_resolution, self.in_resolution)
            x = nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=self.antialias)
            rgb = nn.functional.interpolate(rgb, size=size, mode="bilinear", align_corners=False,
                                            antialias=self.antialias)
        for i in range(self.num_blocks):
            x, rgb = getattr(self, f"block{i}")(
                x, rgb, w_last, noise_mode=noise_mode, fused_modconv=fused_modconv, fp16=fp16, generator=generator
            )
        return rgb
