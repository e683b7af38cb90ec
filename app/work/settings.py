"""What the user asked for, checked once: the fields of the page with their ranges, and :class:`Settings`.

Every range the page shows lives here, once, as a field (:class:`Whole`, :class:`Real`, :class:`Choice`):
the widget takes its label and its limits from the field, and the event that reads the widget parses its
value with the same field, so the label, the component's limits and the refusal always say the same range.
A refusal is a :class:`UserError` in the label's words; nothing is ever rounded or replaced silently:

* a number box sends a float or None (empty, or text the browser could not read as a number): a fraction
  where a whole number belongs, an out-of-range value and None are refused ("got no number");
* through the API a value may also be a string: "12" is read as 12, "abc" is refused as 'abc'.

Ranges come from the library's ``mvar/ranges.py`` (the sampler checks against the same); the page's own
limits are the constants below: the seed's top (what a browser carries exactly) and the images per request.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from mvar import checks, ranges
from mvar.config import AttentionMode
from mvar.devices import DTYPES
from mvar.sampling import SamplingConfig

# The page's own limits, within the library's ranges:
SEED_MAX = 2**53 - 1  # of the library's 0..2^63 - 1: a browser's number carries every integer up to 2^53 exactly
SEED_MAX_TEXT = "2^53 - 1"
CFG_MAX = ranges.CFG_MAX
MAX_IMAGES = 4  # images per generation, unless the server is started with another limit (at most MAX_BATCH)
FULL_WINDOW = "full"  # the Window k choice that turns spatial windows off
BF16_MIN_PARAMETERS = 100_000_000  # below this bf16 buys nothing on a CPU (measured: the default models)


class UserError(ValueError):
    """A problem with what the user asked for: shown in the page, never as a traceback."""


def shown(value, empty: str = "no number") -> str:
    """A refused value as the message shows it; None and blank text are ``empty``."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return empty
    return checks.shown(value)


def as_number(value):
    """A widget value as an int or float when it is one (numeric text included), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        text = value.strip()
        for parse in (int, float):
            try:
                return parse(text)
            except (ValueError, OverflowError):
                pass
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        try:
            return float(value)
        except OverflowError:
            return None
    return None


def as_whole(value) -> int | None:
    """A whole number (3, 3.0, "3"), else None: 2.5, NaN, inf, text and None are not whole."""
    number = as_number(value)
    if isinstance(number, float):
        return int(number) if math.isfinite(number) and number.is_integer() else None
    return number


@dataclass(frozen=True)
class Whole:
    """A whole number from ``low`` to ``high``; ``high_text`` writes the top as the label does ("2^53 - 1")."""

    name: str
    low: int
    high: int
    high_text: str | None = None

    @property
    def range_text(self) -> str:
        return f"{self.low} to {self.high_text or self.high}"

    def label(self, note: str = "") -> str:
        return f"{self.name} ({self.range_text}{'; ' + note if note else ''})"

    def limits(self) -> dict:
        """The component's own limits (gr.Number / gr.Slider keywords)."""
        return dict(minimum=self.low, maximum=self.high, step=1, precision=0)

    def parse(self, value) -> int:
        number = as_whole(value)
        if number is None or not self.low <= number <= self.high:
            exact = f" ({self.high})" if self.high_text else ""
            raise UserError(f"{self.name} must be a whole number from {self.range_text}{exact}, got {shown(value)}")
        return number


@dataclass(frozen=True)
class Real:
    """A finite number from ``low`` (or above it, ``low_open``) to ``high``."""

    name: str
    low: float
    high: float
    low_open: bool = False

    @property
    def range_text(self) -> str:
        return f"above {self.low:g}, up to {self.high:g}" if self.low_open else f"{self.low:g} to {self.high:g}"

    def label(self, note: str = "") -> str:
        return f"{self.name} ({self.range_text}{'; ' + note if note else ''})"

    def limits(self) -> dict:
        return dict(minimum=self.low, maximum=self.high)

    def parse(self, value) -> float:
        number = as_number(value)
        ok = number is not None and math.isfinite(number) and number <= self.high and (
            number > self.low if self.low_open else number >= self.low)
        if not ok:
            wanted = (f"a number above {self.low:g} and at most {self.high:g}" if self.low_open else
                      f"a number from {self.low:g} to {self.high:g}")
            raise UserError(f"{self.name} must be {wanted}, got {shown(value)}")
        return float(number)


@dataclass(frozen=True)
class Choice:
    """One of a list (a dropdown or radio sends one of its choices as text)."""

    name: str
    choices: tuple

    def parse(self, value):
        if isinstance(value, str) and value in self.choices:
            return value
        listed = (f"one of {', '.join(map(str, self.choices))}" if len(self.choices) <= 6 else
                  f"one of the {len(self.choices)} in the list")
        raise UserError(f"{self.name} must be {listed}, got {shown(value, 'nothing')}")


def flag(name: str, value) -> bool:
    """A checkbox: True or False, nothing else."""
    if isinstance(value, bool):
        return value
    raise UserError(f"{name} must be on or off, got {shown(value, 'nothing')}")


SEED = Whole("Seed", ranges.SEED_MIN, SEED_MAX, SEED_MAX_TEXT)
CFG = Real("CFG", ranges.CFG_MIN, ranges.CFG_MAX)
TOP_P = Real("top-p", ranges.TOP_P_MIN, ranges.TOP_P_MAX, low_open=True)


def top_k_field(vocab_size: int) -> Whole:
    return Whole("top-k", ranges.TOP_K_MIN, ranges.top_k_max(vocab_size))


def images_field(max_images: int) -> Whole:
    return Whole("Images", ranges.IMAGES_MIN, max_images)


def refine_field(num_scales: int) -> Whole:
    return Whole("Refine step", ranges.REFINE_STEP_MIN, ranges.refine_step_max(num_scales))


def scale_field(num_scales: int) -> Whole:
    return Whole("Scale", 1, num_scales)  # the page numbers scales from 1


def kernel_choices(patch_nums) -> list[str]:
    """MVAR's window sizes for a model (``ranges.kernel_sizes``), and "full" (no windows)."""
    return [str(k) for k in ranges.kernel_sizes(patch_nums[-1])] + [FULL_WINDOW]


# ---------------------------------------------------------------------------------------------
# A generation request
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """A generation request, checked: what the Generate part, the ablation and ``/generate`` run."""

    class_name: str
    label: int
    seed: int
    sampling: SamplingConfig
    num_images: int
    precision: str
    mvar_mode: AttentionMode

    def sampling_text(self) -> str:
        """"CFG 1.5, top-k 0, top-p 0.9, fp32": how the tokens were drawn."""
        sampling = self.sampling
        smooth = ", Gumbel smoothing" if sampling.smooth else ""
        return (f"CFG {sampling.cfg:g}, top-k {sampling.top_k}, top-p {sampling.top_p:g}{smooth}, "
                f"{self.precision}")

    def windows_text(self, num_scales: int) -> str:
        """MVAR's spatial windows: "7x7 windows from scale 9 on", or "no windows"."""
        mode = self.mvar_mode
        if mode.refine_step >= num_scales:
            return "no windows"
        return f"{mode.kernel_size}x{mode.kernel_size} windows from scale {mode.refine_step + 1} on"


def mvar_mode_for(patch_nums, kernel, refine_step, default_kernel: int = 7) -> AttentionMode:
    """The MVAR attention of the page's Window k and Refine step ("full" k: scale-Markov only, no window on
    any scale; its kernel size, unused, stays the model's ``default_kernel``)."""
    kernel = Choice("Window k", tuple(kernel_choices(patch_nums))).parse(
        str(as_whole(kernel)) if as_whole(kernel) is not None else kernel)
    refine = refine_field(len(patch_nums)).parse(refine_step)
    if kernel == FULL_WINDOW:
        return AttentionMode.mvar(refine_step=len(patch_nums), kernel_size=default_kernel)
    return AttentionMode.mvar(refine_step=refine, kernel_size=int(kernel))


def parse_settings(models, class_name, seed, cfg, top_k, top_p, smooth, num_images, precision, kernel, refine_step,
                   max_images: int = MAX_IMAGES, precisions=None) -> Settings:
    """The Generate part's widget values -> Settings, or a UserError naming the widget in its label's words.

    ``models``: the loaded entry (its classes, vocabulary and scales set the ranges); ``max_images``: the
    server's limit; ``precisions``: the precisions offered here (default: every one)."""
    cfg_model = models.transformer.cfg
    class_name = Choice("Class", tuple(models.class_names)).parse(class_name)
    sampling = SamplingConfig(cfg=CFG.parse(cfg), top_k=top_k_field(cfg_model.vocab_size).parse(top_k),
                              top_p=TOP_P.parse(top_p), smooth=flag("Gumbel smoothing", smooth))
    precision = Choice("Precision", tuple(precisions or DTYPES)).parse(precision)
    return Settings(class_name, models.class_names.index(class_name), SEED.parse(seed), sampling,
                    images_field(max_images).parse(num_images), precision,
                    mvar_mode_for(cfg_model.patch_nums, kernel, refine_step, models.mvar_mode.kernel_size))


def default_precision(models, offered) -> str:
    """fp32 where bf16 gains nothing (small models; and it is exact and batch-invariant), else bf16."""
    if models.transformer.num_parameters < BF16_MIN_PARAMETERS or "bf16" not in offered:
        return "fp32"
    return "bf16"
