"""One training step of the VAR/MVAR transformer, as the trainer takes it and the benchmark times it.

``train/train_transformer.py`` trains with these functions and ``mvar/benchmark.py`` /
``mvar/memory.py`` measure them, so the benchmark's training figures describe the trainer:

* :func:`configure_optimizers`: AdamW with VAR's and MVAR's weight-decay rule, groups printed.
* :class:`TrainingBatch`: labels, the target tokens of every scale, the teacher-forcing inputs.
* :func:`token_weights`: each token's weight in the loss. The official rule weighs every token
  1/L (L = all tokens of all scales, 680 for the 256 px schedule), whatever the step covers.
* :func:`training_step`: forward over the iteration's scales, weighted cross-entropy, backward,
  gradient clipping, the optimiser step (through the fp16 loss scaler where there is one).

What one step covers: VAR's forward is every scale (all L positions, weights summing to 1);
MVAR's is either the joint block of scales 0..refine_step-1 or one windowed scale alone, whose
tokens keep the weight 1/L (with the official schedule: 255/680 and 169/680 or 256/680).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .checks import shown
from .devices import DTYPES, dtype_of

# Substrings of the parameter names VAR's and MVAR's train.py exempt from weight decay; besides
# these, every 1-D tensor and every name ending in "bias" is exempt. In our model the keys match
# pos_start, pos_1LC, lvl_embed.weight and the attention temperatures blocks.*.attn.scale_mul_1H11.
NO_DECAY_KEYS = ("cls_token", "start_token", "task_token", "cfg_uncond", "pos_embed", "pos_1LC", "pos_start",
                 "start_pos", "lvl_embed", "gamma", "beta", "ada_gss", "moe_bias", "scale_mul")
BETAS = (0.9, 0.95)  # AdamW's betas in VAR and MVAR
PRECISIONS = tuple(DTYPES)  # fp32, bf16, fp16
LOSS_WEIGHTINGS = ("token", "mean")
MAX_LOSS_SCALE = 2.0**15  # the official fp16 scaler never grows past this (fp16 overflows at 65504)


# ---------------------------------------------------------------------------------------------
# Optimiser: which parameters decay
# ---------------------------------------------------------------------------------------------


def decays(name: str, param: torch.Tensor) -> bool:
    """VAR's and MVAR's rule: decay everything but 1-D tensors, biases and the NO_DECAY_KEYS names."""
    return not (param.ndim == 1 or name.endswith("bias") or any(key in name for key in NO_DECAY_KEYS))


def parameter_groups(model: torch.nn.Module) -> dict[str, list[tuple[str, torch.nn.Parameter]]]:
    """{"decay": [(name, parameter), ...], "no_decay": [...]} over the trainable parameters."""
    groups: dict[str, list] = {"decay": [], "no_decay": []}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups["decay" if decays(name, param) else "no_decay"].append((name, param))
    return groups


def describe_groups(groups: dict[str, list[tuple[str, torch.nn.Parameter]]], weight_decay: float) -> str:
    """One line per group: tensors, elements, and the names with block indices folded to ``*``."""
    lines = []
    for key, decay in (("decay", weight_decay), ("no_decay", 0.0)):
        named = groups[key]
        patterns = sorted({re.sub(r"\.\d+\.", ".*.", name) for name, _ in named})
        elements = sum(p.numel() for _, p in named)
        lines.append(f"  {key:8s} (weight decay {decay:g}): {len(named)} tensors, {elements:,} elements: "
                     + ", ".join(patterns))
    return "optimizer groups:\n" + "\n".join(lines)


def configure_optimizers(model: torch.nn.Module, lr: float, weight_decay: float, betas=BETAS,
                         log=print) -> torch.optim.AdamW:
    """AdamW over two groups, decaying first and exempt second (the trainer schedules group 0's decay).

    ``log`` (default ``print``) receives the group summary; None prints nothing.
    """
    groups = parameter_groups(model)
    if log is not None:
        log(describe_groups(groups, weight_decay))
    return torch.optim.AdamW([{"params": [p for _, p in groups["decay"]], "weight_decay": weight_decay},
                              {"params": [p for _, p in groups["no_decay"]], "weight_decay": 0.0}],
                             lr=lr, betas=betas)


# ---------------------------------------------------------------------------------------------
# Batch and loss
# ---------------------------------------------------------------------------------------------


def split_scales(flat_tokens: torch.Tensor, schedule) -> list[torch.Tensor]:
    """(B, L) -> per scale (B, p*p)."""
    return [flat_tokens[:, schedule.begin(s) : schedule.end(s)] for s in range(schedule.num_scales)]


@dataclass
class TrainingBatch:
    """labels (B,), tokens (B, L) of every scale, inputs (B, L - n_0, Cvae) for teacher forcing."""

    labels: torch.Tensor
    tokens: torch.Tensor
    inputs: torch.Tensor

    @classmethod
    def from_tokens(cls, tokenizer, tokens: torch.Tensor, labels: torch.Tensor) -> TrainingBatch:
        """The teacher-forcing inputs come from the (frozen) tokenizer, as in every training step."""
        with torch.no_grad():
            inputs = tokenizer.teacher_forcing_inputs(split_scales(tokens, tokenizer.cfg.schedule))
        return cls(labels, tokens, inputs)


def random_tokens(tokenizer_cfg, batch: int, num_classes: int, seed: int = 0, device="cpu"
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens (B, L), labels (B,)) drawn at random: for timing and memory, which do not depend on the values."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, tokenizer_cfg.vocab_size, (batch, tokenizer_cfg.schedule.total_tokens),
                           generator=generator)
    labels = torch.randint(0, num_classes, (batch,), generator=generator)
    return tokens.to(device), labels.to(device)


def token_weights(schedule, first: int, last: int, weighting: str = "token") -> torch.Tensor:
    """Loss weight (N,) of each position of scales first..last.

    "token" (official): every token weighs 1/L, so a step's weights sum to its share of the
    sequence (VAR: 1; MVAR's joint block of the official schedule 255/680, scale 9 256/680).
    "mean": the step's tokens share a total weight of 1 (every kind of step weighs the same).
    """
    if weighting not in LOSS_WEIGHTINGS:
        raise ValueError(f"loss weighting must be one of {', '.join(LOSS_WEIGHTINGS)}, got {shown(weighting)}")
    begin, end = schedule.span(first, last)
    count = end - begin
    return torch.full((count,), 1.0 / (schedule.total_tokens if weighting == "token" else count))


def scale_metrics(ce: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, first: int, schedule
                  ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per scale of the step: (mean cross-entropy, token accuracy), detached. ce and targets (B, N)."""
    correct = (logits.detach().argmax(-1) == targets).float()
    ce = ce.detach()
    out, offset, scale = {}, 0, first
    while offset < targets.shape[1]:
        n = schedule.tokens(scale)
        out[scale] = (ce[:, offset : offset + n].mean(), correct[:, offset : offset + n].mean())
        offset += n
        scale += 1
    return out


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, smoothing: float) -> torch.Tensor:
    """(B, N, V) logits, (B, N) targets -> (B, N) cross-entropy in fp32."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), label_smoothing=smoothing,
                           reduction="none").view(targets.shape)


# ---------------------------------------------------------------------------------------------
# Precision
# ---------------------------------------------------------------------------------------------


def check_precision_name(precision: str) -> str:
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {shown(precision)}")
    return precision


def autocast(device: torch.device, precision: str):
    """Autocast to bf16 or fp16 on the device; nothing for fp32."""
    if check_precision_name(precision) == "fp32":
        return torch.autocast(device_type=torch.device(device).type, enabled=False)
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype_of(precision))


def loss_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """fp16's dynamic loss scaling with the official settings (start at 2^11, grow every 1000 good
    steps, capped at MAX_LOSS_SCALE by training_step); a pass-through for fp32 and bf16."""
    return torch.amp.GradScaler(torch.device(device).type, init_scale=2.0**11, growth_interval=1000,
                                enabled=check_precision_name(precision) == "fp16")


# ---------------------------------------------------------------------------------------------
# The step
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepSettings:
    """How a step computes and applies its loss; the defaults are the official recipe's."""

    label_smoothing: float = 0.0
    grad_clip: float = 2.0  # max global gradient norm; <= 0: no clipping (the norm is still reported)
    loss_weighting: str = "token"  # token (1/L each, official) | mean
    precision: str = "bf16"  # fp32 | bf16 | fp16

    def __post_init__(self) -> None:
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {shown(self.label_smoothing)}")
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"loss_weighting must be one of {', '.join(LOSS_WEIGHTINGS)}, "
                             f"got {shown(self.loss_weighting)}")
        check_precision_name(self.precision)


@dataclass
class StepResult:
    loss: torch.Tensor  # the weighted loss that was backpropagated (detached scalar)
    grad_norm: torch.Tensor  # global gradient norm before clipping
    per_scale: dict[int, tuple[torch.Tensor, torch.Tensor]]  # scale -> (mean CE, accuracy)


def training_step(model: torch.nn.Module, batch: TrainingBatch, mode, first: int, last: int,
                  optimizer: torch.optim.Optimizer, settings: StepSettings = StepSettings(),
                  scaler: torch.amp.GradScaler | None = None) -> StepResult:
    """One optimiser step on scales first..last: forward, weighted CE, backward, clip, step, zero grads.

    ``model`` is the ScaleTransformer or its DistributedDataParallel wrapper (the forward goes
    through the wrapper, so gradients are all-reduced; clipping sees the synchronised gradients).
    The learning rate and weight decay are the caller's: set them in the optimiser's groups first.
    """
    net = getattr(model, "module", model)  # the ScaleTransformer behind a DDP wrapper
    schedule = net.schedule
    begin, end = schedule.span(first, last)
    with autocast(batch.tokens.device, settings.precision):
        logits = model(batch.labels, batch.inputs, mode, first, last)
    targets = batch.tokens[:, begin:end]
    ce = token_cross_entropy(logits, targets, settings.label_smoothing)
    weights = token_weights(schedule, first, last, settings.loss_weighting).to(ce.device)
    loss = (ce * weights).sum(dim=1).mean()  # weighted sum over the step's tokens, mean over the batch
    (scaler.scale(loss) if scaler is not None else loss).backward()
    if scaler is not None:
        scaler.unscale_(optimizer)  # clip the true gradients
    clip = settings.grad_clip if settings.grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
    if scaler is not None:
        scaler.step(optimizer)  # skipped when fp16 gradients overflowed
        if scaler.get_scale() > MAX_LOSS_SCALE:
            scaler.update(new_scale=MAX_LOSS_SCALE)
        else:
            scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)  # free the gradients before the next forward
    return StepResult(loss.detach(), grad_norm.detach(), scale_metrics(ce, logits, targets, first, schedule))
