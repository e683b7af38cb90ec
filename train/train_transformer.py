"""Train the VAR/MVAR transformer on a frozen tokenizer's tokens.

    python -m train.train_transformer --run-dir /tmp/runs/var --mode var --tokenizer assets/tokenizer.safetensors
    python -m train.train_transformer --run-dir /tmp/runs/mvar --mode mvar --init-from /tmp/runs/var/var.safetensors
    torchrun --nproc_per_node 8 -m train.train_transformer --preset d16 --data /data/imagenet --epochs 300 ...

--device auto (default: CUDA when present) | cpu | cuda | cuda:N; under torchrun each rank uses the GPU
of its LOCAL_RANK (NCCL), or the CPU (gloo). --precision fp16 (CUDA only) scales the loss dynamically.

VAR mode: every iteration is a block-causal teacher-forced forward over all scales.
MVAR mode (the paper's "parallel" schedule): an iteration trains either the joint block of the
early scales 0..refine_step-1 under a block-diagonal mask, or exactly one windowed scale alone;
a cycle is ``ratio_k`` joint iterations followed by one iteration per windowed scale.
Every iteration is one ``mvar.training.training_step`` (the function the benchmark times).

Optimisation flags left unset take the recipe of --preset and --mode (``recipe_for``): for the
official presets the published VAR/MVAR commands' settings (lr = base lr x batch / 256, the "lin0"
schedule, no label smoothing, ...), for the small ones this project's. README compares them.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from mvar.checkpoints import load_any, save_model
from mvar.config import AttentionMode, get_preset
from mvar.training import (
    BETAS,
    LOSS_WEIGHTINGS,
    StepSettings,
    TrainingBatch,
    configure_optimizers,
    scale_metrics,
    split_scales,
    token_cross_entropy,
    training_step,
)
from mvar.transformer import ScaleTransformer

from .common import (
    DEFAULT_DIST_TIMEOUT,
    EMA,
    SCHEDULES,
    DistInfo,
    RunFolder,
    Throughput,
    all_reduce_mean,
    autocast_context,
    batch_indices,
    check_output_dir,
    check_precision,
    cleanup_distributed,
    command_line,
    exit_on_collective_failure,
    loss_scaler,
    lr_factor,
    parse_dataclass_args,
    restore_training_state,
    rng_state,
    setup_distributed,
    weight_decay_at,
)
from .data import build_dataset, token_cache


@dataclass(frozen=True)
class Recipe:
    """Optimisation defaults of one (preset, mode): what an unset flag takes."""

    base_lr: float  # peak lr = base_lr x global batch / 256 (official tblr)
    schedule: str = "lin0"  # one of SCHEDULES (official sche)
    warmup_fraction: float = 1 / 50  # warm-up = this share of the steps (official wp = ep/50) ...
    warmup_steps: int = 0  # ... or, when the share is 0, this many steps
    wp0: float = 0.005  # lr ratio at step 0 of the warm-up
    wpe: float = 0.1  # lr ratio at the last step
    alng: float = 1e-3  # init scale of the AdaLN gamma channels (official alng)
    label_smoothing: float = 0.0
    weight_decay: float = 0.05  # official twd
    weight_decay_end: float | None = None  # official twde: None = constant
    grad_clip: float = 2.0  # official tclip
    loss_weighting: str = "token"  # every token 1/L (official)

    def warmup(self, steps: int) -> int:
        return round(self.warmup_fraction * steps) if self.warmup_fraction > 0 else self.warmup_steps


OFFICIAL_DEPTHS = ("d16", "d20", "d24", "d30")
# The published MVAR commands (d16 from scratch, d16/d20/d24 fine-tuned from VAR) all use
# tblr 1e-4, alng 1e-3, wpe 0.1; MVAR publishes no d30 command, so d30 takes the same.
MVAR_RECIPE = Recipe(base_lr=1e-4, alng=1e-3, wpe=0.1)
# The published VAR commands, per depth.
VAR_RECIPES = {
    "d16": Recipe(base_lr=1e-4, alng=1e-3, wpe=0.1),
    "d20": Recipe(base_lr=1e-4, alng=1e-3, wpe=0.1),
    "d24": Recipe(base_lr=8e-5, alng=1e-4, wpe=0.01),
    "d30": Recipe(base_lr=8e-5, alng=1e-5, wpe=0.01, weight_decay_end=0.08),
}
# Our small models (64 px embedded data, a few thousand steps on a CPU): a higher lr (6e-4 at
# the default batch 64), a fixed 200-step warm-up and a cosine to 0.1 x lr, label smoothing 0.1
# (12 classes, a small vocabulary: it overfits fast otherwise), VAR's default gamma init.
SMALL_RECIPE = Recipe(base_lr=2.4e-3, schedule="cos", warmup_fraction=0.0, warmup_steps=200, wpe=0.1, alng=1e-5,
                      label_smoothing=0.1)


def recipe_for(preset: str, mode: str) -> Recipe:
    if preset in OFFICIAL_DEPTHS:
        return MVAR_RECIPE if mode == "mvar" else VAR_RECIPES[preset]
    return SMALL_RECIPE


def from_recipe(kind: type):
    """A flag whose default (None) is taken from the recipe of --preset and --mode."""
    return field(default=None, metadata={"type": kind})


@dataclass
class TransformerTraining:
    run_dir: str
    tokenizer: str = "assets/tokenizer.safetensors"
    preset: str = "small"
    mode: str = "var"  # var | mvar
    init_from: str = ""  # start from these weights (e.g. MVAR fine-tuned from a VAR model)
    data: str = ""  # ImageNet-layout folder (required): DIR/train/<class>/*, DIR/val/<class>/*
    val_size: int = 1024
    refine_step: int = 8
    kernel_size: int = 7
    ratio_k: int = 8  # MVAR: joint iterations per cycle
    steps: int = 6000
    epochs: float = 0.0  # > 0: steps = epochs x (training images // batch size), replacing --steps
    batch_size: int = 64  # global, over all ranks
    # optimisation; unset (None): the recipe of --preset and --mode (recipe_for)
    base_lr: float | None = from_recipe(float)  # peak lr = base_lr x batch_size / 256 ...
    lr: float | None = from_recipe(float)  # ... unless the peak lr is given
    schedule: str | None = from_recipe(str)  # lin0 | lin | lin00 | cos | exp
    warmup: int | None = from_recipe(int)  # warm-up steps
    wp0: float | None = from_recipe(float)  # lr ratio at the first warm-up step
    wpe: float | None = from_recipe(float)  # lr ratio at the last step
    alng: float | None = from_recipe(float)  # init scale of the AdaLN gamma channels (no effect with --init-from)
    label_smoothing: float | None = from_recipe(float)
    weight_decay: float | None = from_recipe(float)
    weight_decay_end: float | None = from_recipe(float)  # cosine from --weight-decay to this; unset: constant
    grad_clip: float | None = from_recipe(float)  # max gradient norm; <= 0: no clipping
    loss_weighting: str | None = from_recipe(str)  # token (every token 1/L) | mean (each step's tokens sum to 1)
    cond_drop: float = 0.1  # label dropout to the null class, for classifier-free guidance
    precision: str = "bf16"  # fp32 | bf16 | fp16 (CUDA)
    device: str = "auto"  # auto | cpu | cuda | cuda:N (torchrun: auto | cpu | cuda, one GPU per LOCAL_RANK)
    ema: float = 0.0
    save_every: int = 250
    log_every: int = 25
    eval_every: int = 1000
    stop_after: int = 0
    seed: int = 0
    num_threads: int = 0  # torch threads (0 = leave torch's default)
    cache_dir: str = ""  # token cache folder (default: <run-dir>/token-cache); runs may share one
    # seconds a collective, or a rank's wait for rank 0's token cache, may stall before the rank exits
    # with an error (a dead rank, a hung one); must exceed rank 0's evaluation and checkpoint time
    dist_timeout: float = DEFAULT_DIST_TIMEOUT
    export: str = ""


RECIPE_FLAGS = ("base_lr", "schedule", "wp0", "wpe", "alng", "label_smoothing", "weight_decay", "grad_clip",
                "loss_weighting")


def apply_recipe(args: TransformerTraining) -> TransformerTraining:
    """Unset optimisation flags from the recipe; the peak lr from the base lr; the warm-up once the
    number of steps is known (with --epochs, that needs the training set: see ``resolve_epochs``)."""
    recipe = recipe_for(args.preset, args.mode)
    values = {name: getattr(recipe, name) for name in RECIPE_FLAGS if getattr(args, name) is None}
    args = replace(args, **values)
    if args.weight_decay_end is None:
        args = replace(args, weight_decay_end=recipe.weight_decay_end
                       if recipe.weight_decay_end is not None else args.weight_decay)
    if args.lr is None:
        args = replace(args, lr=args.base_lr * args.batch_size / 256)
    if args.warmup is None and args.epochs == 0:
        args = replace(args, warmup=recipe.warmup(args.steps))
    return args


def resolve_epochs(args: TransformerTraining, train_images: int) -> TransformerTraining:
    """--epochs E: E x (train_images // batch) steps (each epoch a fresh permutation whose last
    partial batch is dropped, see ``batch_indices``), and the recipe's warm-up for that length."""
    if args.epochs <= 0:
        return args
    steps = round(args.epochs * (train_images // args.batch_size))
    if steps < 1:
        raise SystemExit(f"error: --epochs {args.epochs:g} of {train_images} images at batch {args.batch_size} "
                         "is less than one step")
    warmup = args.warmup if args.warmup is not None else recipe_for(args.preset, args.mode).warmup(steps)
    return replace(args, steps=steps, warmup=warmup)


def check_flags(args: TransformerTraining, error) -> None:
    """Every optimisation flag in its range; ``error`` (the parser's) exits with the message."""
    if args.schedule not in SCHEDULES:
        error(f"--schedule must be one of {', '.join(SCHEDULES)}, got {args.schedule!r}")
    if args.loss_weighting not in LOSS_WEIGHTINGS:
        error(f"--loss-weighting must be one of {', '.join(LOSS_WEIGHTINGS)}, got {args.loss_weighting!r}")
    for name in ("base_lr", "lr"):
        if not getattr(args, name) > 0:
            error(f"--{name.replace('_', '-')} must be a positive learning rate, got {getattr(args, name)}")
    for name in ("wp0", "wpe"):
        if not 0 < getattr(args, name) <= 1:
            error(f"--{name} must be a ratio of the peak lr in (0, 1], got {getattr(args, name)}")
    for name in ("alng", "weight_decay", "weight_decay_end", "epochs"):
        if not getattr(args, name) >= 0:
            error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.warmup is not None and args.warmup < 0:
        error(f"--warmup must be >= 0 steps, got {args.warmup}")
    if not 0 <= args.label_smoothing < 1:
        error(f"--label-smoothing must be in [0, 1), got {args.label_smoothing}")


def parse_args(argv=None) -> TransformerTraining:
    args, parser = parse_dataclass_args(TransformerTraining, "python -m train.train_transformer",
                                        __doc__.split("\n")[0], argv)
    if args.mode not in ("var", "mvar"):
        parser.error(f"--mode must be var or mvar, got {args.mode}")
    if args.ratio_k < 1:
        parser.error(f"--ratio-k must be at least 1 (joint iterations per cycle), got {args.ratio_k}")
    try:
        get_preset(args.preset)
    except ValueError as err:
        parser.error(f"--preset: {err}")
    args = apply_recipe(args)
    check_flags(args, parser.error)
    return args


def describe_recipe(args: TransformerTraining, tokens_per_image: int) -> str:
    """The optimisation settings in effect, in one paragraph (printed at start)."""
    decay = (f"{args.weight_decay:g}" if args.weight_decay_end == args.weight_decay
             else f"{args.weight_decay:g} -> {args.weight_decay_end:g} (cosine)")
    weighting = f"1/{tokens_per_image} per token" if args.loss_weighting == "token" else "mean over each step"
    derived = abs(args.lr - args.base_lr * args.batch_size / 256) <= 1e-12
    source = f"base {args.base_lr:g} x batch {args.batch_size} / 256" if derived else "--lr"
    return (f"recipe ({args.preset}, {args.mode}): AdamW betas {BETAS}, peak lr {args.lr:.3g} ({source}), "
            f"schedule {args.schedule}, warm-up {args.warmup} steps from {args.wp0:g} x lr, down to "
            f"{args.wpe:g} x lr at the last of {args.steps} steps; "
            f"weight decay {decay}; clip {args.grad_clip:g}; label smoothing {args.label_smoothing:g}; "
            f"loss {weighting}; alng {args.alng:g}{' (weights from --init-from)' if args.init_from else ''}")


def build_model(config, args: TransformerTraining, device) -> ScaleTransformer:
    """The transformer with VAR's initialisation from --seed, its AdaLN gamma channels scaled by --alng."""
    torch.manual_seed(args.seed)
    model = ScaleTransformer(config, initialize=False)
    model.init_weights(adaln_gamma=args.alng)
    return model.to(device).train()


def set_schedule(optimizer: torch.optim.Optimizer, args: TransformerTraining, step: int) -> float:
    """This step's lr in every group and weight decay in group 0 (the decaying one); returns the lr."""
    lr = args.lr * lr_factor(args.schedule, step, args.steps, args.warmup, args.wp0, args.wpe)
    decay = weight_decay_at(step, args.steps, args.weight_decay, args.weight_decay_end)
    for index, group in enumerate(optimizer.param_groups):
        group["lr"] = lr
        group["weight_decay"] = decay if index == 0 else 0.0
    return lr


def attention_mode(args: TransformerTraining) -> AttentionMode:
    if args.mode == "var":
        return AttentionMode.var()
    return AttentionMode.mvar(refine_step=args.refine_step, kernel_size=args.kernel_size)


def iteration_scales(step: int, mode: AttentionMode, num_scales: int, ratio_k: int) -> tuple[int, int]:
    """Scales (first, last) trained at ``step``: all of them for VAR; MVAR's cycle otherwise."""
    cycle = mode.training_cycle(num_scales, ratio_k)
    return cycle[step % len(cycle)]


def drop_labels(labels: torch.Tensor, probability: float, null_class: int, seed: int, step: int,
                info: DistInfo) -> torch.Tensor:
    """Label dropout drawn for the whole global batch from (seed, step), then sliced per rank,
    so that N ranks x B samples drop exactly what 1 rank x N*B samples would."""
    generator = torch.Generator().manual_seed(seed * 1_000_033 + step)
    draws = torch.rand(len(labels) * info.world_size, generator=generator)
    mine = draws[info.rank * len(labels) : (info.rank + 1) * len(labels)]
    return torch.where(mine.to(labels.device) < probability, torch.full_like(labels, null_class), labels)


@torch.no_grad()
def evaluate(model: ScaleTransformer, tokenizer, tokens, labels, mode, batch_size=128, precision="bf16") -> dict:
    """Teacher-forced per-scale validation loss (no smoothing) and token accuracy, all scales."""
    model.eval()
    schedule = model.schedule
    device = model.pos_1LC.device  # the token cache stays on the CPU; each batch goes to the model
    sums = torch.zeros(schedule.num_scales, 2)
    for start in range(0, len(tokens), batch_size):
        batch_tokens = tokens[start : start + batch_size].to(device)
        per_scale = split_scales(batch_tokens, schedule)
        inputs = tokenizer.teacher_forcing_inputs(per_scale)
        with autocast_context(device, precision):
            logits = model(labels[start : start + batch_size].to(device), inputs, mode)
        ce = token_cross_entropy(logits, batch_tokens, 0.0)
        stats = scale_metrics(ce, logits, batch_tokens, 0, schedule)
        for scale, (loss, acc) in stats.items():
            sums[scale] += torch.stack([loss, acc]).cpu() * len(batch_tokens)
    model.train()
    sums /= len(tokens)
    return {"val_loss_per_scale": sums[:, 0].tolist(), "val_acc_per_scale": sums[:, 1].tolist(),
            "val_loss": float((sums[:, 0] * torch.tensor([schedule.tokens(s) for s in range(schedule.num_scales)])
                               ).sum() / schedule.total_tokens)}


def export_model(out, model: ScaleTransformer, args: TransformerTraining, class_names, metrics: dict,
                 **card_fields) -> None:
    """Write ``out`` (bf16 safetensors with class names, attention settings and a card) and its JSON card."""
    card = {"kind": "transformer", "trained_mode": args.mode, **card_fields, "batch_size": args.batch_size,
            "init_from": Path(args.init_from).name if args.init_from else None,
            "tokenizer": Path(args.tokenizer).name, "data": args.data, **metrics}
    extra = {"class_names": class_names, "trained_mode": args.mode, "card": card,
             "attention": {"refine_step": args.refine_step, "kernel_size": args.kernel_size}}
    save_model(out, model.eval(), extra=extra, dtype=torch.bfloat16)
    Path(out).with_suffix(".json").write_text(json.dumps(card, indent=2))


@exit_on_collective_failure
def main(argv=None) -> None:
    args = parse_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    info = setup_distributed(args.dist_timeout, args.device)
    check_precision(info.device, args.precision)
    run = RunFolder(args.run_dir)
    if info.is_main:
        check_output_dir(run.path)
    mode = attention_mode(args)
    loaded_tokenizer = load_any(args.tokenizer, "tokenizer")
    tokenizer = loaded_tokenizer.model.to(info.device).eval().requires_grad_(False)
    preset = get_preset(args.preset)
    config = preset.transformer
    model = build_model(config, args, info.device)
    if args.init_from:
        source = load_any(args.init_from, "transformer", device=info.device)
        model.load_state_dict(source.model.state_dict(), strict=True)
    if tokenizer.cfg.patch_nums != config.patch_nums or tokenizer.cfg.vocab_size != config.vocab_size:
        raise SystemExit("error: the tokenizer's schedule/vocabulary does not match the transformer preset")

    train_set, class_names = build_dataset(args.data, "train", tokenizer.cfg.image_size, flip=True, seed=args.seed)
    val_set, _ = build_dataset(args.data, "val", tokenizer.cfg.image_size)
    cache_dir = Path(args.cache_dir) if args.cache_dir else run.path / "token-cache"
    train_tokens, train_labels = token_cache(tokenizer, args.tokenizer, train_set, cache_dir, "train",
                                             is_main=info.is_main, stall_seconds=args.dist_timeout)
    val_tokens, val_labels = token_cache(tokenizer, args.tokenizer, val_set, cache_dir, "val", is_main=info.is_main,
                                         stall_seconds=args.dist_timeout)
    if len(class_names) != config.num_classes:
        raise SystemExit(f"error: the data has {len(class_names)} classes, the preset {config.num_classes}")

    args = resolve_epochs(args, len(train_tokens))
    if info.is_main:
        print(describe_recipe(args, config.schedule.total_tokens))
    optimizer = configure_optimizers(model, args.lr, args.weight_decay, log=print if info.is_main else None)
    settings = StepSettings(label_smoothing=args.label_smoothing, grad_clip=args.grad_clip,
                            loss_weighting=args.loss_weighting, precision=args.precision)
    ema = EMA(model, args.ema) if args.ema > 0 else None
    scaler = loss_scaler(info.device, args.precision)
    step, wall_seconds = 0, 0.0
    state = run.load_latest()
    if state is not None:
        step, wall_seconds = restore_training_state(state, model, optimizer, ema)
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if info.is_main:
            print(f"resumed from step {step}")

    # MVAR's windowed iterations leave pos_start (scale 0 only) unused
    ddp = DistributedDataParallel(model, find_unused_parameters=mode.markov) if info.distributed else model
    schedule = model.schedule
    stop_at = args.steps if args.stop_after <= 0 else min(args.steps, step + args.stop_after)
    progress = tqdm(total=args.steps, initial=step, disable=not info.is_main, desc=f"{args.mode}", smoothing=0.1)
    meter = Throughput()
    started = time.perf_counter()
    window_stats: dict[int, list] = {}

    def checkpoint() -> None:
        if info.is_main:
            run.save(step, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                            "ema": ema.shadow if ema else None, "rng": rng_state(), "step": step,
                            "scaler": scaler.state_dict(),
                            "wall_seconds": wall_seconds + time.perf_counter() - started, "args": asdict(args)})

    while step < stop_at:
        indices = batch_indices(step, len(train_tokens), args.batch_size, args.seed, info)
        flat = train_tokens[indices].to(info.device)
        labels = drop_labels(train_labels[indices].to(info.device), args.cond_drop, config.null_class,
                             args.seed, step, info)
        first, last = iteration_scales(step, mode, schedule.num_scales, args.ratio_k)
        set_schedule(optimizer, args, step)
        batch = TrainingBatch.from_tokens(tokenizer, flat, labels)
        result = training_step(ddp, batch, mode, first, last, optimizer, settings, scaler)
        if ema is not None:
            ema.update(model)
        step += 1
        meter.add(len(indices) * info.world_size)
        for scale, (scale_loss, acc) in result.per_scale.items():
            window_stats.setdefault(scale, []).append((float(scale_loss), float(acc)))

        if step % args.log_every == 0:  # the all-reduce is a collective: every rank must join it
            loss_value = float(all_reduce_mean(result.loss.reshape(1), info))
        if info.is_main and step % args.log_every == 0:
            record = {"step": step, "loss": loss_value, "grad_norm": float(result.grad_norm),
                      "lr": optimizer.param_groups[0]["lr"], "weight_decay": optimizer.param_groups[0]["weight_decay"],
                      "samples_per_s": meter.rate(),
                      "train_loss_per_scale": {s: sum(v[0] for v in vals) / len(vals)
                                               for s, vals in sorted(window_stats.items())},
                      "train_acc_per_scale": {s: sum(v[1] for v in vals) / len(vals)
                                              for s, vals in sorted(window_stats.items())}}
            run.log(record)
            window_stats.clear()
            last_acc = record["train_acc_per_scale"].get(schedule.num_scales - 1)
            progress.set_postfix(loss=f"{loss_value:.3f}", acc_last=f"{last_acc:.3f}" if last_acc else "-",
                                 sps=f"{record['samples_per_s']:.1f}")
        progress.update(1)
        if info.is_main and args.eval_every and step % args.eval_every == 0:
            run.log({"step": step, **evaluate(model, tokenizer, val_tokens, val_labels, mode,
                                              precision=args.precision)})
        if step % args.save_every == 0 or step == stop_at:
            checkpoint()
    progress.close()

    if step >= args.steps and info.is_main and args.export:
        if ema is not None:
            ema.copy_to(model)
        metrics = evaluate(model, tokenizer, val_tokens, val_labels, mode, precision=args.precision)
        export_model(args.export, model, args, class_names, metrics, steps=step, command=command_line(),
                     wall_seconds=round(wall_seconds + time.perf_counter() - started, 1))
        print(f"exported {args.export}: val loss {metrics['val_loss']:.3f}")
    cleanup_distributed()


if __name__ == "__main__":
    main()
