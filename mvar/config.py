"""Dataclasses that describe a model, and the named presets.

A config fully determines the shapes of a state dict, so our safetensors files store it in
their metadata (see ``checkpoints.py``) and a file loads without knowing its config.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields

from .checks import boolean, integer, is_integer, real, shown
from .inert_pickle import quote
from .schedule import OFFICIAL_PATCH_NUMS, ScaleSchedule

# ---------------------------------------------------------------------------------------------
# Bounds on what a config may declare
# ---------------------------------------------------------------------------------------------
# Every config is checked against these before a model is built from it, so a file (our safetensors
# metadata, an official checkpoint's args / config, or its tensor shapes) cannot make the loader allocate
# absurd amounts of memory: a vocabulary of 2**31 would ask the allocator for a terabyte. Each bound is
# several times the largest value of any official model (VAR d16..d36, MVAR d16..d24, the official
# tokenizer, 256 and 512 px) and of our small / tiny presets; the reason is given beside it.
LIMITS: dict[str, int] = {
    "vocab_size": 2**17,  # the official tokenizer has 4096 codes; other VQ tokenizers up to 16384-65536
    "width": 8192,  # VAR-d36 is 2304 wide (64 per block), the largest official model
    "depth": 128,  # VAR-d36 has 36 blocks
    "num_heads": 256,  # official models have one head per block: at most 36
    "num_classes": 100_000,  # ImageNet has 1000 classes, ImageNet-21k 21841; our presets 12
    "latent_channels": 1024,  # the official tokenizer's Cvae is 32, ours 8-16
    "mlp_ratio": 16,  # official 4
    "scales": 64,  # schedule length: the official schedules have 10 scales (256 and 512 px)
    "side": 128,  # largest token map: 16 at 256 px, 32 at 512 px (VAR-d36)
    "tokens": 16384,  # tokens over all scales: 680 at 256 px, 2240 at 512 px; the attention masks are tokens**2
    "image_size": 2048,  # official images are 256 or 512 px, ours 64
    "channels": 1024,  # the official tokenizer's base width is 160, ours 32
    "channel_levels": 8,  # len(channel_mult): 5 levels in the official tokenizer
    "channel_mult": 16,  # each level's multiplier: at most 4 in the official tokenizer
    "num_res_blocks": 16,  # 2 in the official tokenizer
    "num_phi": 64,  # 4 shared Phi convs in the official tokenizer
    "kernel_size": 255,  # MVAR's window: 7 officially; wider than twice the largest side is pointless
    "refine_step": 64,  # MVAR's first windowed scale: 8 officially; at most the number of scales
    "nesting": 16,  # how deep a config / args / metadata value may nest: ours 2, the official args 2-3
    # Weights plus buffers, counted on the meta device before anything is allocated: VAR-d36 at 512 px has
    # 3.5 billion (14 GB in float32), the official tokenizer 0.11 billion.
    "model_elements": 8_000_000_000,
}


def _bounded(name: str, value, low: int, high: int | None = None) -> int:
    """``value`` as an int in [low, high], else a ValueError naming the field and quoting the value short."""
    where = f" in {low}..{high}" if high is not None else f" >= {low}"
    if not is_integer(value):
        raise ValueError(f"{name} must be an integer{where}, got {quote(value)} ({type(value).__name__})")
    if value < low or (high is not None and value > high):
        raise ValueError(f"{name} must be an integer{where}, got {quote(int(value))}")
    return int(value)


def _check_integers(config, **lowest: int) -> None:
    """Each named field must be an int >= its lowest value and <= its bound in LIMITS (if any); numpy ints are
    stored as int (for JSON)."""
    for name, low in lowest.items():
        object.__setattr__(config, name, _bounded(name, getattr(config, name), low, LIMITS.get(name)))


def check_patch_nums(value, name: str = "patch_nums") -> tuple[int, ...]:
    """A scale schedule within LIMITS (scales, side, tokens), checked before it is used, else a ValueError
    naming ``name``."""
    if isinstance(value, str | bytes | dict) or not hasattr(value, "__len__") or not hasattr(value, "__iter__"):
        raise ValueError(f"{name} must be a sequence of positive integers, got {quote(value)}")
    if not 0 < len(value) <= LIMITS["scales"]:
        raise ValueError(f"{name} must name 1..{LIMITS['scales']} scales, got {len(value)}")
    sides = tuple(_bounded(f"{name}[{i}]", side, 1, LIMITS["side"]) for i, side in enumerate(value))
    if any(b <= a for a, b in zip(sides, sides[1:], strict=False)):
        raise ValueError(f"{name} must be strictly increasing, got {quote(sides)}")
    tokens = sum(side * side for side in sides)
    if tokens > LIMITS["tokens"]:
        raise ValueError(f"{name} has {tokens} tokens over all scales; at most {LIMITS['tokens']} are allowed")
    return ScaleSchedule(sides).patch_nums


def _from_dict(cls, data: dict):
    if not isinstance(data, dict):
        raise ValueError(f"{cls.__name__}.from_dict needs a dict, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = [name for name in data if name not in known]
    if unknown:
        shown_names = ", ".join(quote(name, 40) for name in unknown[:3]) + (", ..." if len(unknown) > 3 else "")
        raise ValueError(f"{cls.__name__} has no field(s) {shown_names}")
    for name, value in data.items():  # a sequence field is checked for length before it is copied or echoed
        bound = LIMITS["channel_levels"] if name == "channel_mult" else LIMITS["scales"]
        if isinstance(value, list | tuple) and len(value) > bound:
            raise ValueError(f"{name} has {len(value)} entries; at most {bound} are allowed")
    converted = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    return cls(**converted)


@dataclass(frozen=True)
class TokenizerConfig:
    """Multi-scale residual VQ-VAE (VAR's tokenizer). Defaults are the official 256 px model."""

    vocab_size: int = 4096
    latent_channels: int = 32  # Cvae
    channels: int = 160  # ch
    channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4)  # one entry per resolution level; /2 between levels
    num_res_blocks: int = 2
    patch_nums: tuple[int, ...] = OFFICIAL_PATCH_NUMS
    image_size: int = 256
    num_phi: int = 4  # Phi convs shared over the scales
    phi_ratio: float = 0.5  # Phi(x) = (1-r) x + r conv(x)
    beta: float = 0.25  # commitment loss weight
    use_attention: bool = True  # self-attention at the lowest resolution level
    use_mid_attention: bool = True

    def __post_init__(self) -> None:
        schedule = ScaleSchedule(check_patch_nums(self.patch_nums))
        object.__setattr__(self, "patch_nums", schedule.patch_nums)
        object.__setattr__(self, "channel_mult", _channel_mult(self.channel_mult))
        _check_integers(self, vocab_size=2, latent_channels=1, channels=1, num_res_blocks=1, image_size=1, num_phi=1)
        real("phi_ratio", self.phi_ratio, 0, 1)
        real("beta", self.beta, 0)
        boolean("use_attention", self.use_attention)
        boolean("use_mid_attention", self.use_mid_attention)
        if any(self.channels * m % 32 for m in self.channel_mult):
            raise ValueError("every level's channel count must be a multiple of 32 (GroupNorm with 32 groups)")
        if self.image_size % self.downsample != 0:
            raise ValueError(f"image_size {self.image_size} is not divisible by the downsampling {self.downsample}")
        if self.image_size // self.downsample != schedule.final_side:
            raise ValueError(
                f"the last scale ({schedule.final_side}) must equal the latent side "
                f"image_size/downsample = {self.image_size // self.downsample}"
            )

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def schedule(self) -> ScaleSchedule:
        return ScaleSchedule(self.patch_nums)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_dict(cls, data: dict) -> TokenizerConfig:
        return _from_dict(cls, data)


@dataclass(frozen=True)
class TransformerConfig:
    """The VAR/MVAR transformer: depth d gives width 64d and d heads in the official models."""

    depth: int = 16
    width: int = 1024  # C
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    vocab_size: int = 4096
    latent_channels: int = 32  # Cvae of the tokenizer this model predicts for
    patch_nums: tuple[int, ...] = OFFICIAL_PATCH_NUMS
    norm_eps: float = 1e-6
    drop_path_rate: float = 0.0  # training only
    cond_drop_rate: float = 0.1  # label dropout to the null class, training only

    def __post_init__(self) -> None:
        schedule = ScaleSchedule(check_patch_nums(self.patch_nums))
        object.__setattr__(self, "patch_nums", schedule.patch_nums)
        _check_integers(self, depth=1, width=1, num_heads=1, num_classes=1, vocab_size=2, latent_channels=1)
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
        real("mlp_ratio", self.mlp_ratio, 0, LIMITS["mlp_ratio"], low_open=True)
        if self.mlp_hidden < 1:
            raise ValueError(f"mlp_ratio {self.mlp_ratio} leaves the MLP without hidden units at width {self.width}")
        real("norm_eps", self.norm_eps, 0, low_open=True)
        real("drop_path_rate", self.drop_path_rate, 0, 1)
        real("cond_drop_rate", self.cond_drop_rate, 0, 1)

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return round(self.width * self.mlp_ratio)

    @property
    def schedule(self) -> ScaleSchedule:
        return ScaleSchedule(self.patch_nums)

    @property
    def null_class(self) -> int:
        """Row of the class embedding used for unconditional / CFG branches."""
        return self.num_classes

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_dict(cls, data: dict) -> TransformerConfig:
        return _from_dict(cls, data)


@dataclass(frozen=True)
class AttentionMode:
    """How the transformer's tokens may attend.

    ``markov=False`` is VAR: block-causal over all earlier scales (KV cache at inference).
    ``markov=True`` is MVAR: a scale attends only to itself (scale-Markov), and on scales
    ``>= refine_step`` each query attends only to a ``kernel_size`` x ``kernel_size``
    window of its own grid (spatial-Markov).
    """

    markov: bool = False
    refine_step: int = 8
    kernel_size: int = 7
    backend: str = "auto"  # windowed attention backend: auto | dense | gather | natten

    def __post_init__(self) -> None:
        boolean("markov", self.markov)
        if is_integer(self.kernel_size) and (self.kernel_size < 1 or self.kernel_size % 2 == 0):
            raise ValueError(f"kernel_size must be a positive odd number, got {quote(self.kernel_size)}")
        _check_integers(self, refine_step=0, kernel_size=1)
        if not isinstance(self.backend, str) or self.backend not in ("auto", "dense", "gather", "natten"):
            raise ValueError(f"unknown attention backend {shown(self.backend)}; choose auto, dense, gather or natten")

    @property
    def name(self) -> str:
        return "MVAR" if self.markov else "VAR"

    def is_windowed(self, scale: int) -> bool:
        return self.markov and scale >= self.refine_step

    def training_cycle(self, num_scales: int, ratio_k: int = 8) -> tuple[tuple[int, int], ...]:
        """Scales (first, last) of each training iteration, in order; training repeats the cycle.

        VAR trains every scale at every iteration. MVAR's "parallel" schedule: ``ratio_k`` joint
        iterations over the early scales, then one iteration per windowed scale alone.
        """
        num_scales, ratio_k = integer("num_scales", num_scales, low=1), integer("ratio_k", ratio_k, low=1)
        if not self.markov:
            return ((0, num_scales - 1),)
        windowed = tuple((s, s) for s in range(self.refine_step, num_scales))
        if not windowed:
            return ((0, num_scales - 1),)
        joint = ((0, self.refine_step - 1),) * ratio_k if self.refine_step > 0 else ()
        return joint + windowed

    @classmethod
    def var(cls) -> AttentionMode:
        return cls(markov=False)

    @classmethod
    def mvar(cls, refine_step: int = 8, kernel_size: int = 7, backend: str = "auto") -> AttentionMode:
        return cls(markov=True, refine_step=refine_step, kernel_size=kernel_size, backend=backend)

    @classmethod
    def mvar_from_extra(cls, extra: dict, refine_step: int | None = None, kernel_size: int | None = None
                        ) -> AttentionMode:
        """MVAR attention as a checkpoint was trained with (its ``extra["attention"]``), unless overridden;
        the official defaults where the file says nothing."""
        saved = extra.get("attention") if isinstance(extra, dict) else None
        saved = saved if isinstance(saved, dict) else {}
        default = cls.mvar()
        return cls.mvar(
            refine_step=refine_step if refine_step is not None else saved.get("refine_step", default.refine_step),
            kernel_size=kernel_size if kernel_size is not None else saved.get("kernel_size", default.kernel_size),
        )


VAR_MODE = AttentionMode.var()
MVAR_MODE = AttentionMode.mvar()


def official_transformer(depth: int) -> TransformerConfig:
    """VAR's published hyperparameters for depth ``depth`` (width 64d, d heads)."""
    return TransformerConfig(
        depth=depth, width=64 * depth, num_heads=depth, drop_path_rate=0.1 * depth / 24
    )


def _channel_mult(value) -> tuple[int, ...]:
    if isinstance(value, str | bytes | dict) or not hasattr(value, "__len__") or not hasattr(value, "__iter__"):
        raise ValueError(f"channel_mult must be a sequence of positive integers, got {quote(value)}")
    if not 0 < len(value) <= LIMITS["channel_levels"]:
        raise ValueError(f"channel_mult must name 1..{LIMITS['channel_levels']} levels, got {len(value)}")
    return tuple(_bounded(f"channel_mult[{i}]", m, 1, LIMITS["channel_mult"]) for i, m in enumerate(value))


OFFICIAL_TOKENIZER = TokenizerConfig()

# The small models this project trains on its 64 px emoji set: a /4 tokenizer gives the
# same 16x16 latent and 10-scale schedule as the official 256 px models.
SMALL_TOKENIZER = TokenizerConfig(
    vocab_size=512, latent_channels=16, channels=32, channel_mult=(1, 2, 4), num_res_blocks=1, image_size=64
)


@dataclass(frozen=True)
class Preset:
    name: str
    transformer: TransformerConfig
    tokenizer: TokenizerConfig = field(default=OFFICIAL_TOKENIZER)


PRESETS: dict[str, Preset] = {
    **{f"d{d}": Preset(f"d{d}", official_transformer(d)) for d in (16, 20, 24, 30)},
    "small": Preset(
        "small",
        TransformerConfig(
            depth=6, width=128, num_heads=2, num_classes=12,
            vocab_size=SMALL_TOKENIZER.vocab_size, latent_channels=SMALL_TOKENIZER.latent_channels,
            drop_path_rate=0.0,
        ),
        SMALL_TOKENIZER,
    ),
    "tiny": Preset(  # for tests: a few hundred thousand parameters
        "tiny",
        TransformerConfig(
            depth=2, width=64, num_heads=2, num_classes=12, vocab_size=32, latent_channels=8,
        ),
        TokenizerConfig(
            vocab_size=32, latent_channels=8, channels=32, channel_mult=(1, 1, 1), num_res_blocks=1,
            image_size=64,
        ),
    ),
}


def get_preset(name: str) -> Preset:
    if not isinstance(name, str) or name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]
