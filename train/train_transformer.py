"""Train the VAR/MVAR transformer on a frozen tokenizer's tokens.

    python -m train.train_transformer --run-dir /tmp/runs/var --mode var --tokenizer assets/tokenizer.safetensors
    python -m train.train_transformer --run-dir /tmp/runs/mvar --mode mvar --init-from /tmp/runs/var/var.safetensors
    torchrun --nproc_per_node 8 -m train.train_transformer --preset d16 --data /data/imagenet ...

--device auto (default: CUDA when present) | cpu | cuda | cuda:N; under torchrun each rank uses the GPU
of its LOCAL_RANK (NCCL), or the CPU (gloo). --precision fp16 (CUDA only) scales the loss dynamically.

VAR mode: every iteration is a block-causal teacher-forced forward over all scales.
MVAR mode (the paper's "parallel" schedule): an iteration trains either the joint block of the
early scales 0..refine_step-1 under a block-diagonal mask, or exactly one windowed scale alone;
a cycle is ``ratio_k`` joint iterations followed by one iteration per windowed scale.
Cross-entropy with label smoothing; every token weighs 1/L (L = all tokens of all scales).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from mvar.checkpoints import load_any, save_model
from mvar.config import AttentionMode, get_preset
from mvar.transformer import ScaleTransformer

from .common import (
    DEFAULT_DIST_TIMEOUT,
    EMA,
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
    parse_dataclass_args,
    restore_training_state,
    rng_state,
    setup_distributed,
    warmup_cosine,
)
from .data import build_dataset, token_cache


@dataclass
class TransformerTraining:
    run_dir: str
    tokenizer: str = "assets/tokenizer.safetensors"
    preset: str = "small"
    mode: str = "var"  # var | mvar
    init_from: str = ""  # start from these weights (e.g. MVAR fine-tuned from a VAR model)
    data: str = "embedded"
    train_size: int = 50_000
    val_size: int = 1024
    refine_step: int = 8
    kernel_size: int = 7
    ratio_k: int = 8  # MVAR: joint iterations per cycle
    steps: int = 6000
    batch_size: int = 64  # global, over all ranks
    lr: float = 6e-4
    warmup: int = 200
    weight_decay: float = 0.05
    grad_clip: float = 2.0
    label_smoothing: float = 0.1
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


def parse_args(argv=None) -> TransformerTraining:
    args, parser = parse_dataclass_args(TransformerTraining, "python -m train.train_transformer",
                                        __doc__.split("\n")[0], argv)
    if args.mode not in ("var", "mvar"):
        parser.error(f"--mode must be var or mvar, got {args.mode}")
    if args.ratio_k < 1:
        parser.error(f"--ratio-k must be at least 1 (joint iterations per cycle), got {args.ratio_k}")
    return args


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


def scale_losses(logits, targets, first, schedule, smoothing: float):
    """Summed CE (B, N) -> per-scale mean loss and accuracy, and the loss weighted 1/L per token."""
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), label_smoothing=smoothing,
                         reduction="none").view(targets.shape)
    correct = (logits.argmax(-1) == targets).float()
    per_scale, offset = {}, 0
    scale = first
    while offset < targets.shape[1]:
        n = schedule.tokens(scale)
        per_scale[scale] = (ce[:, offset : offset + n].mean().detach(), correct[:, offset : offset + n].mean())
        offset += n
        scale += 1
    weighted = ce.sum() / (targets.shape[0] * schedule.total_tokens)
    return weighted, per_scale


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
        _, stats = scale_losses(logits.float(), batch_tokens, 0, schedule, 0.0)
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


def split_scales(flat_tokens: torch.Tensor, schedule) -> list[torch.Tensor]:
    """(B, L) -> per scale (B, p*p)."""
    return [flat_tokens[:, schedule.begin(s) : schedule.end(s)] for s in range(schedule.num_scales)]


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
    torch.manual_seed(args.seed)
    model = ScaleTransformer(config).to(info.device).train()
    if args.init_from:
        source = load_any(args.init_from, "transformer", device=info.device)
        model.load_state_dict(source.model.state_dict(), strict=True)
    if tokenizer.cfg.patch_nums != config.patch_nums or tokenizer.cfg.vocab_size != config.vocab_size:
        raise SystemExit("error: the tokenizer's schedule/vocabulary does not match the transformer preset")

    train_set, class_names = build_dataset(args.data, "train", tokenizer.cfg.image_size, args.train_size,
                                           args.seed, flip=True)
    val_set, _ = build_dataset(args.data, "val", tokenizer.cfg.image_size, args.val_size, args.seed, flip=False)
    cache_dir = Path(args.cache_dir) if args.cache_dir else run.path / "token-cache"
    train_tokens, train_labels = token_cache(tokenizer, args.tokenizer, train_set, cache_dir, "train",
                                             is_main=info.is_main, stall_seconds=args.dist_timeout)
    val_tokens, val_labels = token_cache(tokenizer, args.tokenizer, val_set, cache_dir, "val", is_main=info.is_main,
                                         stall_seconds=args.dist_timeout)
    if len(class_names) != config.num_classes:
        raise SystemExit(f"error: the data has {len(class_names)} classes, the preset {config.num_classes}")

    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if param.ndim < 2 or "emb" in name or "pos_" in name else decay).append(param)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
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
        with torch.no_grad():
            inputs = tokenizer.teacher_forcing_inputs(split_scales(flat, schedule))
        for group in optimizer.param_groups:
            group["lr"] = warmup_cosine(step, args.steps, args.warmup, args.lr)
        with autocast_context(info.device, args.precision):
            logits = ddp(labels, inputs, mode, first, last)
        targets = flat[:, schedule.begin(first) : schedule.end(last)]
        loss, per_scale = scale_losses(logits.float(), targets, first, schedule, args.label_smoothing)
        scaler.scale(loss).backward()  # the scaler is a pass-through except for fp16
        scaler.unscale_(optimizer)  # clip the true gradients
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        scaler.step(optimizer)  # skipped when fp16 gradients overflowed
        scaler.update()
        optimizer.zero_grad(set_to_none=True)  # free the gradients before the next forward
        if ema is not None:
            ema.update(model)
        step += 1
        meter.add(len(indices) * info.world_size)
        for scale, (scale_loss, acc) in per_scale.items():
            window_stats.setdefault(scale, []).append((float(scale_loss), float(acc)))

        if step % args.log_every == 0:  # the all-reduce is a collective: every rank must join it
            loss_value = float(all_reduce_mean(loss.detach().reshape(1), info))
        if info.is_main and step % args.log_every == 0:
            record = {"step": step, "loss": loss_value, "grad_norm": float(grad_norm),
                      "lr": optimizer.param_groups[0]["lr"], "samples_per_s": meter.rate(),
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
