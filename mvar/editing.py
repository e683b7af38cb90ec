"""Zero-shot editing of real images with a next-scale model: in-painting, out-painting, class-conditional
edits and variations, in VAR or MVAR mode, with no training (the command line is ``edit.py``).

The image is encoded into its per-scale tokens. Generation then runs scale by scale as usual
(``sampling.generate_steps``, so previews and stepping work unchanged), except that at every scale the
tokens outside the mask are forced to the image's own tokens and only those inside are sampled. The mask
(True = regenerate) is area-downsampled to each scale: a token is regenerated when at least ``threshold``
of its area lies inside the mask. Optionally the final image is blended in pixel space, so that pixels
outside the mask are exactly the tokenizer's reconstruction of the image.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from . import checks
from .config import VAR_MODE, AttentionMode
from .devices import autocast
from .sampling import ForcedTokens, SamplingConfig, ScaleStep, compute_dtype, decode_to_unit, generate_steps
from .tokenizer import MultiScaleVQVAE
from .transformer import ScaleTransformer

MAX_IMAGE_PIXELS = 50_000_000  # a larger upload is refused before decoding (PIL's bomb limit is 89 MP)
DEFAULT_THRESHOLD = 0.5


class NothingToEdit(ValueError):
    """The mask selects no token at any scale: the edit would return the image's reconstruction."""


# ----- images and masks -----------------------------------------------------------------------


@dataclass(frozen=True)
class PreparedImage:
    pixels: torch.Tensor  # (3, S, S) in [0, 1]
    note: str  # what was done to fit the model ("" when nothing)
    crop: tuple[int, int, int, int]  # (left, top, right, bottom) of the original that was kept


def open_image(path, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """An image file, or a ValueError that names the file and the problem (not an image, too large)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such image file")
    try:
        with Image.open(path) as image:
            if image.width * image.height > max_pixels:
                raise ValueError(f"{path}: the image is {image.width}x{image.height} pixels, over the limit of "
                                 f"{max_pixels / 1e6:.0f} megapixels")
            image.load()
            return image.copy()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as err:
        raise ValueError(f"{path}: not a readable image file ({type(err).__name__})") from None


def _center_square(width: int, height: int) -> tuple[int, int, int, int]:
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def prepare_image(image: Image.Image, size: int) -> PreparedImage:
    """Any PIL image (any size, aspect ratio or mode) -> the model's RGB ``size`` x ``size`` input.

    Non-square images are centre-cropped to a square, then resized; transparent pixels are put on white;
    grayscale and palette images are converted to RGB. The note says which of these happened."""
    if not isinstance(image, Image.Image):
        raise ValueError(f"expected a PIL image, got {type(image).__name__}")
    size = checks.integer("size", size, low=1)
    notes = []
    if image.mode not in ("RGB", "RGBA"):
        notes.append(f"converted from {image.mode} to RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        if rgba.getextrema()[3][0] < 255:
            notes.append(f"transparent pixels put on white ({image.mode})")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    if image.mode != "RGB":
        image = image.convert("RGB")
    crop = _center_square(*image.size)
    if crop != (0, 0, *image.size):
        notes.append(f"centre-cropped from {image.width}x{image.height} to {crop[2] - crop[0]}x{crop[3] - crop[1]}")
        image = image.crop(crop)
    if image.size != (size, size):
        notes.append(f"resized from {image.width}x{image.height} to {size}x{size}")
        image = image.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=3.0)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()
    return PreparedImage(pixels, "; ".join(notes), crop)


def prepare_mask(mask, size: int, crop: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """A mask (PIL image or 2-D array; white / nonzero / opaque = regenerate) -> (size, size) bool.

    A PIL mask with transparency uses its alpha (a painted layer); otherwise its brightness. ``crop``
    applies the same crop as the image's (:class:`PreparedImage`), so the two stay aligned."""
    size = checks.integer("size", size, low=1)
    if isinstance(mask, Image.Image):
        if mask.mode in ("RGBA", "LA", "PA") or (mask.mode == "P" and "transparency" in mask.info):
            plane = mask.convert("RGBA").getchannel("A")
            if plane.getextrema() == (255, 255):  # opaque everywhere: read the paint, not the alpha
                plane = mask.convert("L")
        else:
            plane = mask.convert("L")
        values = np.asarray(plane, dtype=np.float32) / 255.0
    else:
        values = np.asarray(mask.detach().cpu() if torch.is_tensor(mask) else mask, dtype=np.float32)
        if values.ndim != 2:
            raise ValueError(f"a mask array must be 2-D (height, width), got shape {values.shape}")
    if crop is not None:
        left, top, right, bottom = crop
        if values.shape[1] < right or values.shape[0] < bottom:
            raise ValueError(f"the mask is {values.shape[1]}x{values.shape[0]}, smaller than the image it masks")
        values = values[top:bottom, left:right]
    tensor = torch.from_numpy(np.ascontiguousarray(values))[None, None]
    if tuple(tensor.shape[-2:]) != (size, size):
        tensor = F.interpolate(tensor, size=(size, size), mode="area")
    return tensor[0, 0] >= 0.5


def outpaint_mask(size: int, keep_box: tuple[int, int, int, int]) -> torch.Tensor:
    """Out-painting: regenerate everything outside ``keep_box`` = (left, top, right, bottom) pixels."""
    size = checks.integer("size", size, low=1)
    if len(keep_box) != 4:
        raise ValueError(f"keep_box must be (left, top, right, bottom), got {checks.shown(keep_box)}")
    left, top, right, bottom = (checks.integer(n, v, 0, size) for n, v in zip("ltrb", keep_box, strict=True))
    if not (left < right and top < bottom):
        raise ValueError(f"keep_box {keep_box} is empty: it needs left < right and top < bottom")
    mask = torch.ones(size, size, dtype=torch.bool)
    mask[top:bottom, left:right] = False
    return mask


def token_masks(mask: torch.Tensor, patch_nums: Sequence[int], threshold: float = DEFAULT_THRESHOLD
                ) -> list[torch.Tensor]:
    """Pixel mask (H, W) or (B, H, W) bool -> per scale (B, p*p) bool: True = regenerate that token."""
    threshold = checks.real("threshold", threshold, 0, 1, low_open=True)
    masks = mask[None] if mask.ndim == 2 else mask
    area = masks.float()[:, None]
    return [(F.interpolate(area, size=(p, p), mode="area") >= threshold).flatten(1) for p in patch_nums]


# ----- planning and running an edit -------------------------------------------------------------


@dataclass(frozen=True)
class EditPlan:
    """What an edit keeps: the image's tokens per scale, and where they are kept (``forced.keep``)."""

    forced: ForcedTokens
    regenerate: torch.Tensor  # (B, H, W) bool pixel mask used for the final blend
    image_f_hat: torch.Tensor  # (B, Cvae, h, w): the image's full token pyramid, accumulated

    @property
    def regenerated_tokens(self) -> list[int]:
        """Tokens sampled per scale, for the first sample."""
        return [int((~keep[0]).sum()) for keep in self.forced.keep]


@torch.no_grad()
def plan_edit(tokenizer: MultiScaleVQVAE, image: torch.Tensor, mask: torch.Tensor, batch: int = 1,
              keep_scales: int = 0, threshold: float = DEFAULT_THRESHOLD) -> EditPlan:
    """Encode ``image`` (3, S, S) in [0, 1] and decide, per scale, which tokens to keep for ``batch`` samples.

    mask (S, S) bool: True = regenerate. keep_scales: the first ``keep_scales`` scales are kept whole
    (variations: the image's coarse layout with new detail). Raises :class:`NothingToEdit` if nothing
    would be sampled."""
    size = tokenizer.cfg.image_size
    if not torch.is_tensor(image) or tuple(image.shape) != (3, size, size) or not image.is_floating_point():
        raise ValueError(f"image must be a float tensor (3, {size}, {size}) in [0, 1], got "
                         f"{tuple(image.shape) if torch.is_tensor(image) else type(image).__name__}")
    if not torch.is_tensor(mask) or mask.dtype != torch.bool or tuple(mask.shape) != (size, size):
        raise ValueError(f"mask must be a bool tensor ({size}, {size}) (True = regenerate)")
    batch = checks.integer("batch", batch, low=1)
    patch_nums = tokenizer.cfg.patch_nums
    keep_scales = checks.integer("keep_scales", keep_scales, 0, len(patch_nums))
    weight = tokenizer.quant_conv.weight
    pixels = image.to(weight.device, weight.dtype)[None].mul(2).sub(1)
    image_tokens, f_hats = tokenizer.quantize.quantize(tokenizer.encode_latent(pixels))
    regenerate = token_masks(mask.to(weight.device), patch_nums, threshold)
    keep = [torch.ones_like(r) if s < keep_scales else ~r for s, r in enumerate(regenerate)]
    if all(bool(k.all()) for k in keep):
        raise NothingToEdit("nothing to edit: the mask covers less than "
                            f"{threshold:.0%} of any token at every scale, so every token would be the image's own")
    return EditPlan(
        forced=ForcedTokens(tokens=tuple(t.expand(batch, -1) for t in image_tokens),
                            keep=tuple(k.expand(batch, -1) for k in keep)),
        regenerate=mask[None].expand(batch, -1, -1),
        image_f_hat=f_hats[-1],
    )


def edit_steps(transformer: ScaleTransformer, tokenizer: MultiScaleVQVAE, plan: EditPlan, label: int,
               seeds: int | Sequence[int] = 0, sampling: SamplingConfig | None = None,
               mode: AttentionMode = VAR_MODE, **step_options) -> Iterator[ScaleStep]:
    """The edit's generation, one scale at a time: :func:`sampling.generate_steps` with the plan's tokens
    forced. ``seeds``: one per sample of the plan, or one int (sample i uses seed + i)."""
    batch = plan.forced.tokens[0].shape[0]
    label = checks.integer("label", label, 0, transformer.cfg.num_classes - 1)
    return generate_steps(transformer, tokenizer, [label] * batch, seeds, sampling, mode,
                          forced=plan.forced, **step_options)


def blend(generated: torch.Tensor, reconstruction: torch.Tensor, regenerate: torch.Tensor) -> torch.Tensor:
    """Pixels inside ``regenerate`` (B, H, W) from ``generated``, the rest from ``reconstruction`` (B, 3, H, W)."""
    inside = regenerate.to(generated.device)[:, None]
    return torch.where(inside, generated, reconstruction.to(generated.device))


@dataclass
class EditResult:
    images: torch.Tensor  # (B, 3, H, W) in [0, 1], blended if asked
    unblended: torch.Tensor  # (B, 3, H, W): the decoded generation itself
    reconstruction: torch.Tensor  # (1, 3, H, W): the tokenizer's reconstruction of the input image
    tokens: list[torch.Tensor]  # per scale (B, p*p)
    plan: EditPlan


@torch.no_grad()
def edit(transformer: ScaleTransformer, tokenizer: MultiScaleVQVAE, image: torch.Tensor, mask: torch.Tensor,
         label: int, seeds: int | Sequence[int] = 0, sampling: SamplingConfig | None = None,
         mode: AttentionMode = VAR_MODE, keep_scales: int = 0, final_blend: bool = True,
         threshold: float = DEFAULT_THRESHOLD, dtype: torch.dtype | None = None) -> EditResult:
    """Edit one image for several seeds (a batch): in-painting when ``mask`` marks a region, out-painting
    with :func:`outpaint_mask`, class-conditional editing with another ``label``, variations with
    ``keep_scales`` > 0 and a full mask."""
    batch = len(seeds) if isinstance(seeds, Sequence) else 1
    plan = plan_edit(tokenizer, image, mask, batch, keep_scales, threshold)
    steps = list(edit_steps(transformer, tokenizer, plan, label, seeds, sampling, mode, dtype=dtype))
    device = steps[-1].f_hat.device
    with autocast(device, compute_dtype(transformer, dtype)):
        generated = decode_to_unit(tokenizer, steps[-1].f_hat)
        reconstruction = decode_to_unit(tokenizer, plan.image_f_hat)
    images = blend(generated, reconstruction.expand_as(generated), plan.regenerate) if final_blend else generated
    return EditResult(images, generated, reconstruction, [s.tokens for s in steps], plan)


# ----- the image's own pyramid ------------------------------------------------------------------


@dataclass
class Pyramid:
    """The tokenizer's view of an image: what the transformer learns to predict, scale by scale."""

    reconstructions: torch.Tensor  # (S, 3, H, W) in [0, 1]: decode of the first s+1 scales
    psnr: list[float]  # dB against the input, per scale
    tokens: list[torch.Tensor]  # per scale (p, p) token ids


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of two images in [0, 1]."""
    mse = float((a.float() - b.float()).square().mean())
    return float("inf") if mse == 0 else 10 * float(np.log10(1.0 / mse))


@torch.no_grad()
def image_pyramid(tokenizer: MultiScaleVQVAE, image: torch.Tensor) -> Pyramid:
    """Per-scale reconstructions of ``image`` (3, S, S) in [0, 1], their PSNR and the token maps."""
    size = tokenizer.cfg.image_size
    if not torch.is_tensor(image) or tuple(image.shape) != (3, size, size):
        raise ValueError(f"image must be a tensor (3, {size}, {size}) in [0, 1]")
    weight = tokenizer.quant_conv.weight
    pixels = image.to(weight.device, weight.dtype)[None].mul(2).sub(1)
    tokens, f_hats = tokenizer.quantize.quantize(tokenizer.encode_latent(pixels))
    with autocast(weight.device, tokenizer.decoder.conv_in.weight.dtype):
        reconstructions = decode_to_unit(tokenizer, torch.cat(f_hats))
    reference = image.to(reconstructions.device)
    return Pyramid(reconstructions, [psnr(r, reference) for r in reconstructions],
                   [t[0].view(p, p).cpu() for t, p in zip(tokens, tokenizer.cfg.patch_nums, strict=True)])
