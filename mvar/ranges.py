"""The valid range of every generation setting, in one place.

The library checks its arguments against these (``sampling.SamplingConfig.validate``, ``generate_steps``),
and the app's widgets take their limits and labels from them, so a label, a widget's limits and a
refusal always state the same range. Ranges that depend on the model are functions of it.
"""

from __future__ import annotations

SEED_MIN = 0
SEED_MAX = 2**63 - 1  # the generator's seeds; the library folds any other integer into 0..SEED_MAX (mod 2^63)
SEED_MODULUS = SEED_MAX + 1

CFG_MIN = 0.0  # 0 = no guidance (no unconditional branch runs)
CFG_MAX = 10.0  # past 10 the images saturate

TOP_K_MIN = 0  # 0 = off; the largest is the vocabulary size, see top_k_max

TOP_P_MIN = 0.0  # excluded: top-p is in (0, 1]
TOP_P_MAX = 1.0  # 1 = off

IMAGES_MIN = 1
MAX_BATCH = 64  # samples per generation, unless the caller allows more (generate_steps' max_batch)

KERNEL_SIZE_MIN = 1  # MVAR's window side: odd, at most the largest grid's side, see kernel_sizes

REFINE_STEP_MIN = 0  # MVAR's first windowed scale (0-based); the largest, the number of scales, means no window


def top_k_max(vocab_size: int) -> int:
    """The largest top-k: the whole vocabulary (the same as off)."""
    return int(vocab_size)


def kernel_sizes(final_side: int) -> tuple[int, ...]:
    """MVAR's window sides for a model whose largest grid is ``final_side``: the odd numbers up to it (windows
    are shifted inward at the borders, so a window as wide as the grid already sees all of it)."""
    return tuple(range(KERNEL_SIZE_MIN, int(final_side) + 1, 2))


def refine_step_max(num_scales: int) -> int:
    """The largest refine step: the number of scales (no scale is windowed)."""
    return int(num_scales)
