"""Multi-scale residual VQ-VAE: VAR's tokenizer, with the state-dict layout of VAR's official files.

An image is encoded to a latent ``f`` of shape (B, Cvae, h, w) and quantised scale by scale:
scale ``s`` area-downsamples what is still unexplained (the residual) to p_s x p_s, picks the
nearest codebook entry per position, upsamples the chosen embeddings back to h x w (bicubic),
refines them with a "Phi" conv and adds them to the running reconstruction ``f_hat``. Decoding
any partial ``f_hat`` gives the per-scale preview images.

Module names (``encoder.down.0.block.1.conv2``, ``quantize.quant_resi.qresi_ls.3`` ...) follow
the official checkpoint ``vae_ch160v4096z32.pth`` so it loads strictly.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .checks import integer, real
from .config import TokenizerConfig


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Decoded images (B, 3, H, W) in [0, 1] -> (B, H, W, 3) uint8 for PNG files and the page."""
    return images.clamp(0, 1).mul(255).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def decode_to_unit(tokenizer: MultiScaleVQVAE, f_hat: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    """An accumulated map f_hat (B, Cvae, h, w) -> its images (B, 3, H, W) in [0, 1], fp32: the tokenizer's
    full decode (the final image of a generation, or the preview of a partial map)."""
    return tokenizer.decode(f_hat, chunk_size=chunk_size).float().add(1).mul(0.5).clamp(0, 1)


def _check_tensor(name: str, value, ndim: int, floating: bool = True) -> torch.Tensor:
    """A tensor of ``ndim`` dims, floating point (or integer with ``floating=False``), else ValueError."""
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(value).__name__}")
    kind_ok = value.is_floating_point() if floating else not (value.is_floating_point() or value.is_complex()
                                                                  or value.dtype == torch.bool)
    if value.ndim != ndim or not kind_ok:
        kind = "floating-point" if floating else "integer"
        raise ValueError(f"{name} must be a {ndim}-D {kind} tensor, got {value.dtype} of shape {tuple(value.shape)}")
    return value


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # a 1x1 projection only when the width changes (no parameters otherwise, as in the official file)
        self.nin_shortcut = (
            nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention over all h*w positions, with a residual connection."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(batch, 3, channels, height * width).unbind(1)
        # (B, C, HW) -> (B, 1, HW, C): one head over the pixels
        q, k, v = (t.transpose(1, 2).unsqueeze(1) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, scale=channels**-0.5)
        out = out.squeeze(1).transpose(1, 2).reshape(batch, channels, height, width)
        return x + self.proj_out(out)


class Downsample2x(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # asymmetric padding (right and bottom only) keeps the official models' alignment
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample2x(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


def _level(blocks: list[nn.Module], attns: list[nn.Module]) -> nn.Module:
    level = nn.Module()
    level.block = nn.ModuleList(blocks)
    level.attn = nn.ModuleList(attns)
    return level


def _middle(channels: int, use_attention: bool) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels)
    mid.attn_1 = AttnBlock(channels) if use_attention else nn.Identity()
    mid.block_2 = ResnetBlock(channels, channels)
    return mid


class Encoder(nn.Module):
    """Image (B, 3, H, W) in [-1, 1] -> latent (B, Cvae, H/d, W/d), d = 2**(levels-1)."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        mults = cfg.channel_mult
        self.conv_in = nn.Conv2d(3, cfg.channels, 3, padding=1)
        self.down = nn.ModuleList()
        width = cfg.channels
        for level, mult in enumerate(mults):
            is_lowest = level == len(mults) - 1
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(width, cfg.channels * mult))
                width = cfg.channels * mult
                if is_lowest and cfg.use_attention:
                    attns.append(AttnBlock(width))
            down = _level(blocks, attns)
            if not is_lowest:
                down.downsample = Downsample2x(width)
            self.down.append(down)
        self.mid = _middle(width, cfg.use_mid_attention)
        self.norm_out = _group_norm(width)
        self.conv_out = nn.Conv2d(width, cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for down in self.down:
            for i, block in enumerate(down.block):
                h = block(h)
                if len(down.attn):
                    h = down.attn[i](h)
            if hasattr(down, "downsample"):
                h = down.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent (B, Cvae, h, w) -> image (B, 3, h*d, w*d), unclamped."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        mults = cfg.channel_mult
        width = cfg.channels * mults[-1]
        self.conv_in = nn.Conv2d(cfg.latent_channels, width, 3, padding=1)
        self.mid = _middle(width, cfg.use_mid_attention)
        levels: list[nn.Module] = []
        for level in reversed(range(len(mults))):
            is_lowest = level == len(mults) - 1
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(width, cfg.channels * mults[level]))
                width = cfg.channels * mults[level]
                if is_lowest and cfg.use_attention:
                    attns.append(AttnBlock(width))
            up = _level(blocks, attns)
            if level != 0:
                up.upsample = Upsample2x(width)
            levels.insert(0, up)  # self.up[i] is resolution level i, as in the official file
        self.up = nn.ModuleList(levels)
        self.norm_out = _group_norm(width)
        self.conv_out = nn.Conv2d(width, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for up in reversed(self.up):
            for i, block in enumerate(up.block):
                h = block(h)
                if len(up.attn):
                    h = up.attn[i](h)
            if hasattr(up, "upsample"):
                h = up.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Phi(nn.Conv2d):
    """Refiner of an upsampled scale embedding: (1 - r) * x + r * conv3x3(x)."""

    def __init__(self, channels: int, ratio: float):
        super().__init__(channels, channels, 3, padding=1)
        self.ratio = ratio

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (1 - self.ratio) + super().forward(x) * self.ratio


class SharedPhis(nn.Module):
    """K Phi convs shared over S scales: scale s uses the one whose tick is nearest s/(S-1)."""

    def __init__(self, channels: int, ratio: float, count: int):
        super().__init__()
        self.qresi_ls = nn.ModuleList(Phi(channels, ratio) for _ in range(count))
        if count == 4:
            self.ticks = np.linspace(1 / 12, 11 / 12, 4)
        else:
            self.ticks = np.linspace(1 / (2 * count), 1 - 1 / (2 * count), count)

    def for_position(self, at: float) -> Phi:
        """The Phi of a scale at relative position ``at`` = s/(S-1) in [0, 1]."""
        at = real("at", at, 0, 1)
        return self.qresi_ls[int(np.argmin(np.abs(self.ticks - at)))]


class MultiScaleQuantizer(nn.Module):
    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_nums = cfg.patch_nums
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.latent_channels)
        self.quant_resi = SharedPhis(cfg.latent_channels, cfg.phi_ratio, cfg.num_phi)
        # codebook hits per scale: kept for layout compatibility and usage reporting
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(cfg.patch_nums), cfg.vocab_size))

    def phi(self, scale: int) -> Phi:
        scale = self.cfg.schedule.check_scale(scale)  # out of range would silently pick the nearest Phi
        last = len(self.patch_nums) - 1
        return self.quant_resi.for_position(scale / last if last else 0.0)

    def upsampled_scale_embedding(self, scale: int, h_small: torch.Tensor) -> torch.Tensor:
        """(B, Cvae, p_s, p_s) embeddings of scale s -> their refined contribution (B, Cvae, h, w)."""
        side = self.patch_nums[-1]
        if h_small.shape[-1] != side:
            h_small = F.interpolate(h_small, size=(side, side), mode="bicubic")
        return self.phi(scale)(h_small)

    def embed_tokens(self, scale: int, tokens: torch.Tensor) -> torch.Tensor:
        """Token indices (B, p*p) of scale s -> embeddings (B, Cvae, p, p)."""
        side = self.patch_nums[self.cfg.schedule.check_scale(scale)]
        _check_tensor("tokens", tokens, 2, floating=False)
        if tokens.shape[1] != side * side:
            raise ValueError(f"scale {scale} tokens must be (B, {side * side}), got {tuple(tokens.shape)}")
        return self.embedding(tokens).transpose(1, 2).reshape(tokens.shape[0], -1, side, side)

    def nearest_codes(self, vectors: torch.Tensor) -> torch.Tensor:
        """(N, Cvae) -> (N,) index of the L2-nearest codebook entry."""
        codebook = self.embedding.weight.detach().float()
        vectors = vectors.float()
        distances = (
            vectors.square().sum(1, keepdim=True)
            - 2 * vectors @ codebook.T
            + codebook.square().sum(1)
        )
        return distances.argmin(dim=1)

    def quantize(self, f: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Latent (B, Cvae, h, w) -> (tokens per scale (B, p*p), f_hat after each scale (B, Cvae, h, w)).

        No gradient flows (use ``forward`` for training).
        """
        _check_tensor("f", f, 4)
        batch, channels, height, width = f.shape
        if (height, width) != (self.patch_nums[-1],) * 2:
            raise ValueError(
                f"latent is {height}x{width} but the scale schedule ends at {self.patch_nums[-1]}"
            )
        residual = f.detach().float().clone()
        f_hat = torch.zeros_like(residual)
        tokens, f_hats = [], []
        for scale, side in enumerate(self.patch_nums):
            small = F.interpolate(residual, size=(side, side), mode="area") if side != height else residual
            idx = self.nearest_codes(small.permute(0, 2, 3, 1).reshape(-1, channels)).view(batch, side * side)
            contribution = self.upsampled_scale_embedding(scale, self.embed_tokens(scale, idx))
            f_hat = f_hat + contribution
            residual = residual - contribution
            tokens.append(idx)
            f_hats.append(f_hat)
        return tokens, f_hats

    def forward(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Training pass: (f_hat with straight-through gradient, VQ loss, tokens per scale).

        The codebook and Phi convs learn from ||f_hat - sg(f)||^2; the encoder from the commitment
        term beta * ||sg(f_hat) - f||^2 and, through the straight-through estimator, the decoder's loss.
        """
        f = f.float()
        batch, channels, height, _ = f.shape
        target = f.detach()
        residual = target.clone()
        f_hat = torch.zeros_like(target)
        tokens = []
        loss = f.new_zeros(())
        for scale, side in enumerate(self.patch_nums):
            small = F.interpolate(residual, size=(side, side), mode="area") if side != height else residual
            idx = self.nearest_codes(small.permute(0, 2, 3, 1).reshape(-1, channels)).view(batch, side * side)
            contribution = self.upsampled_scale_embedding(scale, self.embed_tokens(scale, idx))
            f_hat = f_hat + contribution
            residual = residual - contribution.detach()
            tokens.append(idx)
            loss = loss + F.mse_loss(f_hat, target) + self.cfg.beta * F.mse_loss(f_hat.detach(), f)
        loss = loss / len(self.patch_nums)
        straight_through = f + (f_hat - f).detach()
        return straight_through, loss, tokens


# output pixels per decoder call (2 images at 256x256): its full-resolution activations then stay
# near 100 MB, below the generation's own peak, at no cost in speed
DECODE_CHUNK_PIXELS = 2**17


class MultiScaleVQVAE(nn.Module):
    """Image <-> multi-scale tokens. Images are (B, 3, H, W) in [-1, 1]."""

    @classmethod
    def empty(cls, cfg: TokenizerConfig, device="cpu") -> MultiScaleVQVAE:
        """Allocated but uninitialised (fast): for loading weights that overwrite every tensor."""
        with torch.device("meta"):
            model = cls(cfg)
        model = model.to_empty(device=device)
        for buffer in model.buffers():  # statistics, not weights: start from zero, never from stale memory
            buffer.zero_()
        return model

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = MultiScaleQuantizer(cfg)
        self.quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 3, padding=1)
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 3, padding=1)

    @property
    def patch_nums(self) -> tuple[int, ...]:
        return self.cfg.patch_nums

    def check_images(self, images: torch.Tensor) -> None:
        size = self.cfg.image_size
        if not isinstance(images, torch.Tensor) or not images.is_floating_point():
            kind = f"{images.dtype} tensor" if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"expected floating-point images (B, 3, {size}, {size}), got a {kind}")
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[2:] != (size, size):
            raise ValueError(f"expected images of shape (B, 3, {size}, {size}), got {tuple(images.shape)}")

    def encode_latent(self, images: torch.Tensor) -> torch.Tensor:
        self.check_images(images)
        return self.quant_conv(self.encoder(images))

    def encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Images -> token indices per scale, each (B, p*p)."""
        return self.quantize.quantize(self.encode_latent(images))[0]

    def check_tokens(self, tokens: list[torch.Tensor]) -> None:
        if isinstance(tokens, torch.Tensor) or not isinstance(tokens, list | tuple):
            raise ValueError(f"tokens must be a list of per-scale tensors, got {type(tokens).__name__}")
        if not 1 <= len(tokens) <= len(self.patch_nums):
            raise ValueError(f"expected 1..{len(self.patch_nums)} token maps, got {len(tokens)}")
        for scale, idx in enumerate(tokens):
            side = self.patch_nums[scale]
            _check_tensor(f"scale {scale} tokens", idx, 2, floating=False)
            if idx.shape[0] != tokens[0].shape[0]:
                raise ValueError(f"scale {scale} has {idx.shape[0]} samples, scale 0 has {tokens[0].shape[0]}")
            if idx.ndim != 2 or idx.shape[1] != side * side:
                raise ValueError(f"scale {scale} tokens must be (B, {side * side}), got {tuple(idx.shape)}")
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.cfg.vocab_size):
                raise ValueError(f"scale {scale} has token ids outside 0..{self.cfg.vocab_size - 1}")

    def tokens_to_fhats(self, tokens: list[torch.Tensor]) -> list[torch.Tensor]:
        """Tokens of the first s scales -> accumulated f_hat after each of them, (B, Cvae, h, w) each."""
        self.check_tokens(tokens)
        f_hats = []
        f_hat = None
        for scale, idx in enumerate(tokens):
            contribution = self.quantize.upsampled_scale_embedding(scale, self.quantize.embed_tokens(scale, idx))
            f_hat = contribution if f_hat is None else f_hat + contribution
            f_hats.append(f_hat)
        return f_hats

    def add_scale(self, f_hat: torch.Tensor, scale: int, h_small: torch.Tensor) -> torch.Tensor:
        """Accumulate scale s's embeddings (B, Cvae, p_s, p_s) into f_hat (returns a new tensor)."""
        side = self.patch_nums[self.cfg.schedule.check_scale(scale)]
        self._check_f_hat(f_hat)
        _check_tensor("h_small", h_small, 4)
        if tuple(h_small.shape) != (f_hat.shape[0], self.cfg.latent_channels, side, side):
            raise ValueError(f"h_small of scale {scale} must be ({f_hat.shape[0]}, {self.cfg.latent_channels}, "
                             f"{side}, {side}), got {tuple(h_small.shape)}")
        return f_hat + self.quantize.upsampled_scale_embedding(scale, h_small)

    def scale_input(self, f_hat: torch.Tensor, scale: int) -> torch.Tensor:
        """Transformer input of scale s>0: f_hat area-downsampled to p_s, as tokens (B, p_s*p_s, Cvae)."""
        side = self.patch_nums[self.cfg.schedule.check_scale(scale)]
        self._check_f_hat(f_hat)
        small = f_hat if f_hat.shape[-1] == side else F.interpolate(f_hat, size=(side, side), mode="area")
        return small.flatten(2).transpose(1, 2)

    def _check_f_hat(self, f_hat) -> None:
        """An accumulated map (B, Cvae, p_last, p_last)."""
        side = self.patch_nums[-1]
        _check_tensor("f_hat", f_hat, 4)
        if tuple(f_hat.shape[1:]) != (self.cfg.latent_channels, side, side):
            raise ValueError(f"f_hat must be (B, {self.cfg.latent_channels}, {side}, {side}), got {tuple(f_hat.shape)}")

    def teacher_forcing_inputs(self, tokens: list[torch.Tensor]) -> torch.Tensor:
        """Inputs of scales 1..S-1 for the teacher-forced forward: (B, L - 1, Cvae) for a 1x1 first scale.

        Scale s sees the accumulated map of scales < s, area-downsampled to p_s x p_s.
        """
        self.check_tokens(tokens)
        if len(tokens) != len(self.patch_nums):
            raise ValueError(f"expected {len(self.patch_nums)} token maps, got {len(tokens)}")
        f_hats = self.tokens_to_fhats(tokens[:-1])
        return torch.cat([self.scale_input(f_hats[s - 1], s) for s in range(1, len(self.patch_nums))], dim=1)

    def decode(self, f_hat: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
        """f_hat (B, Cvae, h, w) -> images (B, 3, H, W) in [-1, 1], decoded in chunks to bound memory.

        chunk_size: images per decoder call; None picks it from DECODE_CHUNK_PIXELS.
        """
        _check_tensor("f_hat", f_hat, 4)
        if f_hat.ndim != 4 or f_hat.shape[1] != self.cfg.latent_channels:
            raise ValueError(f"expected f_hat (B, {self.cfg.latent_channels}, h, w), got {tuple(f_hat.shape)}")
        if chunk_size is None:
            pixels = f_hat.shape[2] * f_hat.shape[3] * self.cfg.downsample**2
            chunk_size = max(1, DECODE_CHUNK_PIXELS // pixels)
        integer("chunk_size", chunk_size, low=1)
        # the decoder may be stored in bf16 and channels-last (see sampling.set_precision): feed it likewise
        weight = self.decoder.conv_in.weight
        layout = torch.channels_last if not weight.is_contiguous() else torch.contiguous_format
        chunks = [
            self.decoder(self.post_quant_conv(part.to(weight.dtype).contiguous(memory_format=layout))).clamp(-1, 1)
            for part in f_hat.split(chunk_size)
        ]
        return torch.cat(chunks)

    def reconstruct(self, images: torch.Tensor, num_scales: int | None = None) -> torch.Tensor:
        """Encode, keep the first ``num_scales`` scales, decode: the per-scale preview of a real image."""
        num_scales = len(self.patch_nums) if num_scales is None else num_scales
        num_scales = integer("num_scales", num_scales, 1, len(self.patch_nums))
        _, f_hats = self.quantize.quantize(self.encode_latent(images))
        return self.decode(f_hats[num_scales - 1])

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Training pass: (reconstruction, VQ loss, tokens per scale)."""
        f_hat, vq_loss, tokens = self.quantize(self.encode_latent(images))
        return self.decoder(self.post_quant_conv(f_hat)), vq_loss, tokens
