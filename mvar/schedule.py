"""The next-scale schedule: which token maps exist and where each sits in the flat sequence.

VAR and MVAR predict a pyramid of square token maps, 1x1 up to 16x16 by default. In the
teacher-forced sequence the maps are laid end to end, smallest first: scale ``s`` owns the
positions ``[begin(s), end(s))``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .checks import is_integer, shown

OFFICIAL_PATCH_NUMS: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


@dataclass(frozen=True)
class ScaleSchedule:
    """Side lengths of the token maps, smallest first."""

    patch_nums: tuple[int, ...] = OFFICIAL_PATCH_NUMS

    def __post_init__(self) -> None:
        if isinstance(self.patch_nums, str | bytes) or not hasattr(self.patch_nums, "__iter__"):
            raise ValueError(f"patch_nums must be a sequence of positive integers, got {shown(self.patch_nums)}")
        nums = tuple(self.patch_nums)
        if not nums:
            raise ValueError("patch_nums must name at least one scale")
        if any(not is_integer(p) or p < 1 for p in nums):
            raise ValueError(f"patch_nums must be positive integers, got {shown(nums)}")
        nums = tuple(int(p) for p in nums)  # numpy ints -> int: the tuple goes into JSON metadata
        if any(b <= a for a, b in zip(nums, nums[1:], strict=False)):
            raise ValueError(f"patch_nums must be strictly increasing, got {nums}")
        object.__setattr__(self, "patch_nums", nums)

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    @property
    def total_tokens(self) -> int:
        return sum(p * p for p in self.patch_nums)

    @property
    def final_side(self) -> int:
        return self.patch_nums[-1]

    def tokens(self, scale: int) -> int:
        return self.patch_nums[self.check_scale(scale)] ** 2

    def begin(self, scale: int) -> int:
        return sum(p * p for p in self.patch_nums[: self.check_scale(scale)])

    def end(self, scale: int) -> int:
        return self.begin(scale) + self.tokens(scale)

    def span(self, first: int, last: int) -> tuple[int, int]:
        """Flat positions ``[begin, end)`` covered by scales ``first..last`` inclusive."""
        first, last = self.check_range(first, last)
        return self.begin(first), self.end(last)

    def check_scale(self, scale: int) -> int:
        if not is_integer(scale):
            raise ValueError(f"scale index must be an int in 0..{self.num_scales - 1}, got {type(scale).__name__}")
        if not 0 <= scale < self.num_scales:
            raise ValueError(f"scale index {shown(scale)} is out of range 0..{self.num_scales - 1}")
        return int(scale)

    def check_range(self, first: int, last: int | None = None) -> tuple[int, int]:
        """Valid scale indices ``first <= last`` (None = the last scale), else ValueError."""
        first = self.check_scale(first)
        last = self.check_scale(self.num_scales - 1 if last is None else last)
        if last < first:
            raise ValueError(f"empty scale range {first}..{last}")
        return first, last

    def scale_of_positions(self, first: int = 0, last: int | None = None) -> torch.Tensor:
        """Scale index of every flat position of scales ``first..last``: LongTensor (L,)."""
        first, last = self.check_range(first, last)
        return torch.cat(
            [torch.full((self.tokens(s),), s, dtype=torch.long) for s in range(first, last + 1)]
        )

    def guidance_ratio(self, scale: int) -> float:
        """s / (S-1): VAR's CFG ramp and the Phi tick position of scale ``s``."""
        scale = self.check_scale(scale)  # checked even when there is a single scale
        return 0.0 if self.num_scales == 1 else scale / (self.num_scales - 1)
