"""Previews: what a generation's partial maps decode to, each decoded once, and only when wanted.

After every scale a generation holds the accumulated map ``f_hat`` (``sampling.ScaleStep.f_hat``). The
preview of that scale is the tokenizer's full decode of the map: the image the partial map stands for.
(The decoder was trained on full-size maps only; a map shrunk to the scale's side and decoded there shows
a colour cast, not the picture.) A full decode costs the same at every scale, on d16 (256 px) about half
the transformer's work for one image, so decoding every scale of every sample would cost several
generations. Two tools bound that cost by doing less, never by showing something else:

* :class:`Previews` keeps a generation's maps (32 KB per sample and scale on d16) and decodes the preview
  of (scale, sample) the first time it is asked for, then caches it: a viewer pays for what it shows (the
  scales a slider visits, the sample picked, a filmstrip).
* :class:`PreviewBudget` decides, while a generation streams (``generate_steps(previews=True,
  preview_budget=...)``), which scales are decoded as they come: a scale's preview is decoded when the
  time spent on previews so far, plus one more decode, stays within ``share`` of the generation's own
  time so far. The last scale is always decoded (it is the final image); the skipped ones are left to
  :class:`Previews`. With the default share, 0.5, the streamed previews add at most half the generation's
  time (plus the one decode that measures their cost, when nothing has measured it yet).

``decode_previews`` is the one decode both use, so a preview is the same whether the stream or the cache
decoded it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from . import checks
from .devices import autocast, checked_dtype
from .tokenizer import MultiScaleVQVAE, decode_to_unit

DEFAULT_PREVIEW_SHARE = 0.5  # streamed previews may add this share of the generation's own time


@torch.no_grad()
def decode_previews(tokenizer: MultiScaleVQVAE, f_hat: torch.Tensor, dtype: torch.dtype | None = None
                    ) -> torch.Tensor:
    """The previews of partial maps f_hat (n, Cvae, h, w): their full decodes (n, 3, H, W) in [0, 1], fp32,
    under autocast to ``dtype`` (the generation's; None = none) on the map's device."""
    with autocast(f_hat.device, dtype):
        return decode_to_unit(tokenizer, f_hat)


@dataclass
class PreviewBudget:
    """Which scales a streaming generation decodes as it goes (see the module's docstring).

    share: previews may take this share of the generation's time so far (0: only the last scale's; a large
    value: every scale's). decode_seconds: the expected time of one step's previews, learnt from the
    decodes of the streams that use this budget (None until one has; see :meth:`measured`). Keep one per
    model and precision, so that later generations know the cost before their first scale."""

    share: float = DEFAULT_PREVIEW_SHARE
    decode_seconds: float | None = None

    def __post_init__(self) -> None:
        self.share = checks.real("share", self.share, low=0)
        if self.decode_seconds is not None:
            self.decode_seconds = checks.real("decode_seconds", self.decode_seconds, low=0)

    def allows(self, generation_seconds: float, preview_seconds: float, last: bool) -> bool:
        """Decode this scale's preview now? Always the last scale's; else when no decode has been measured
        yet (this one measures it), or when one more keeps ``preview_seconds`` (spent so far on this
        stream's previews) within ``share`` of ``generation_seconds`` (the generation's time so far)."""
        if last or self.decode_seconds is None:
            return True
        return preview_seconds + self.decode_seconds <= self.share * generation_seconds

    def measured(self, seconds: float) -> None:
        """Record the time one step's previews took to decode. A slower decode counts at once, a faster one
        halfway: the estimate leans high, so a decode that happened to run fast does not overspend the next."""
        seconds = float(seconds)
        old = self.decode_seconds
        self.decode_seconds = seconds if old is None else max(seconds, (old + seconds) / 2)


class Previews:
    """The per-scale previews of one generation, decoded when first asked for and cached.

    ``add`` each step's map as the generation runs, with the previews the stream decoded (if any);
    ``image(tokenizer, scale, sample)`` then gives the full decode of that partial map, decoding it the
    first time. Holds CPU tensors only (no model), so it can be kept, pickled or sent to another process;
    pass the tokenizer the generation ran with (same weights and precision). ``dtype``: the generation's
    ``dtype`` argument, so that a preview decoded here equals one the stream decoded. Threads may share
    one: at worst a preview is decoded twice.
    """

    def __init__(self, dtype: torch.dtype | None = None):
        self.dtype = checked_dtype(dtype)
        self.maps: list[torch.Tensor] = []  # per scale (B, Cvae, h, w), fp32 on the CPU
        self.seconds = 0.0  # time spent decoding here (the stream's own decodes are in its steps)
        self._images: dict[tuple[int, int], torch.Tensor] = {}  # (scale, sample) -> (3, H, W) fp32 on the CPU

    @property
    def num_scales(self) -> int:
        return len(self.maps)

    @property
    def num_samples(self) -> int:
        return self.maps[0].shape[0] if self.maps else 0

    @property
    def nbytes(self) -> int:
        """Memory held: the maps and the decoded previews."""
        return sum(t.nbytes for t in self.maps) + sum(t.nbytes for t in self._images.values())

    def add(self, f_hat: torch.Tensor, preview: torch.Tensor | None = None) -> int:
        """Keep the next scale's map f_hat (B, Cvae, h, w) and, if given, its decoded previews (n, 3, H, W)
        of samples 0..n-1 (a step's ``f_hat`` and ``preview``). Returns the scale's index."""
        if not torch.is_tensor(f_hat) or f_hat.ndim != 4 or not f_hat.is_floating_point():
            raise ValueError(f"f_hat must be a 4-D float tensor (B, Cvae, h, w), got {checks.shown(f_hat)}")
        if self.maps and f_hat.shape != self.maps[0].shape:
            raise ValueError(f"every scale's map must be {tuple(self.maps[0].shape)}, got {tuple(f_hat.shape)}")
        if preview is not None and (not torch.is_tensor(preview) or preview.ndim != 4
                                    or not 1 <= preview.shape[0] <= f_hat.shape[0]):
            raise ValueError(f"preview must be (n, 3, H, W) for the first n <= {f_hat.shape[0]} samples, "
                             f"got {checks.shown(preview)}")
        scale = len(self.maps)
        self.maps.append(f_hat.detach().float().cpu())
        for sample, image in enumerate(() if preview is None else preview):
            self._images[(scale, sample)] = image.detach().float().cpu()
        return scale

    def _checked(self, scale, sample) -> tuple[int, int]:
        if not self.maps:
            raise ValueError("no scale has been added yet")
        return (checks.integer("scale", scale, 0, self.num_scales - 1),
                checks.integer("sample", sample, 0, self.num_samples - 1))

    def is_decoded(self, scale: int, sample: int = 0) -> bool:
        """Whether the preview is in hand (asking for it costs nothing)."""
        return self._checked(scale, sample) in self._images

    def image(self, tokenizer: MultiScaleVQVAE, scale: int, sample: int = 0) -> torch.Tensor:
        """The preview of ``scale`` of ``sample`` (0-based): (3, H, W) in [0, 1], fp32 on the CPU."""
        key = self._checked(scale, sample)
        image = self._images.get(key)
        if image is None:
            device = tokenizer.post_quant_conv.weight.device
            started = time.perf_counter()
            image = decode_previews(tokenizer, self.maps[key[0]][key[1] : key[1] + 1].to(device), self.dtype)[0].cpu()
            self.seconds += time.perf_counter() - started
            self._images[key] = image
        return image

    def images(self, tokenizer: MultiScaleVQVAE, sample: int = 0) -> torch.Tensor:
        """Every scale's preview of ``sample`` (S, 3, H, W), the missing ones decoded now (a filmstrip)."""
        return torch.stack([self.image(tokenizer, scale, sample) for scale in range(self.num_scales)])
