"""Train the multi-scale residual VQ-VAE (the tokenizer).

    python -m train.train_tokenizer --run-dir /tmp/runs/tok --preset small --steps 3000
    torchrun --nproc_per_node 8 -m train.train_tokenizer --run-dir runs/tok --preset d16 --data /data/imagenet

--device auto (default: CUDA when present) | cpu | cuda | cuda:N; under torchrun each rank uses the GPU
of its LOCAL_RANK (NCCL), or the CPU (gloo). --precision fp16 (CUDA only) scales the loss dynamically.

Loss: L1 + L2 reconstruction + the quantiser's loss (codebook term and beta x commitment), with
the straight-through estimator carrying the decoder's gradient to the encoder. Dead codes (no hit
over ``--reseed-every`` steps) are re-seeded from current encoder residuals and reported.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from mvar.checkpoints import save_model
from mvar.config import get_preset
from mvar.tokenizer import MultiScaleVQVAE

from .common import (
    DEFAULT_DIST_TIMEOUT,
    EMA,
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
from .data import build_dataset


@dataclass
class TokenizerTraining:
    run_dir: str
    preset: str = "small"
    data: str = ""  # ImageNet-layout folder (required): DIR/train/<class>/*, DIR/val/<class>/*
    val_size: int = 512
    steps: int = 3000
    batch_size: int = 32  # global, over all ranks
    lr: float = 4e-4
    warmup: int = 100
    weight_decay: float = 0.0
    l1_weight: float = 1.0
    l2_weight: float = 1.0
    vq_weight: float = 1.0
    grad_clip: float = 2.0
    precision: str = "bf16"  # fp32 | bf16 | fp16 (CUDA)
    device: str = "auto"  # auto | cpu | cuda | cuda:N (torchrun: auto | cpu | cuda, one GPU per LOCAL_RANK)
    ema: float = 0.0  # 0 = off
    reseed_every: int = 250  # re-seed codes unused over this many steps (0 = off)
    save_every: int = 250
    log_every: int = 25
    stop_after: int = 0  # stop this process after this many steps (0 = run to the end): chunked runs
    seed: int = 0
    num_threads: int = 0  # torch threads (0 = leave torch's default)
    export: str = ""  # write the final model here in our safetensors format
    dist_timeout: float = DEFAULT_DIST_TIMEOUT  # seconds a collective may stall (a dead or hung rank) before exiting


def parse_args(argv=None) -> TokenizerTraining:
    return parse_dataclass_args(TokenizerTraining, "python -m train.train_tokenizer", __doc__.split("\n")[0], argv)[0]


class CodeUsage:
    """Codebook hits since the last re-seed, summed over scales (and ranks)."""

    def __init__(self, vocab: int):
        self.hits = torch.zeros(vocab)

    def add(self, tokens: list[torch.Tensor]) -> None:
        for idx in tokens:
            self.hits += torch.bincount(idx.flatten().cpu(), minlength=len(self.hits)).float()

    def dead(self) -> torch.Tensor:
        return (self.hits == 0).nonzero().flatten()


@torch.no_grad()
def reseed_dead_codes(model: MultiScaleVQVAE, images: torch.Tensor, dead: torch.Tensor, generator) -> int:
    """Move dead codebook entries onto random latent vectors of the current batch (+ small noise)."""
    if dead.numel() == 0:
        return 0
    latent = model.encode_latent(images).float().cpu()  # the draws come from a CPU generator
    vectors = latent.permute(0, 2, 3, 1).reshape(-1, latent.shape[1])
    # the residual after the coarse scales is what late-scale codes must represent
    pick = torch.randint(0, len(vectors), (dead.numel(),), generator=generator)
    noise = torch.randn(dead.numel(), vectors.shape[1], generator=generator) * 0.01
    codebook = model.quantize.embedding.weight
    codebook[dead.to(codebook.device)] = (vectors[pick] * 0.5 + noise).to(codebook.device, codebook.dtype)
    return int(dead.numel())


@torch.no_grad()
def codebook_use(model: MultiScaleVQVAE, dataset, count: int, batch_size: int = 64) -> float:
    """Fraction of the codebook that the tokens of ``count`` held-out images use."""
    seen = torch.zeros(model.cfg.vocab_size, dtype=torch.bool)
    device = model.quantize.embedding.weight.device
    for start in range(0, min(count, len(dataset)), batch_size):
        images = torch.stack([dataset[i][0] for i in range(start, min(count, len(dataset), start + batch_size))])
        for tokens in model.encode(images.to(device)):
            seen[tokens.flatten().cpu()] = True
    return float(seen.float().mean())


def psnr(reconstruction: torch.Tensor, images: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = F.mse_loss(reconstruction.float().clamp(-1, 1), images.float())
    return float(10 * torch.log10(4.0 / mse.clamp_min(1e-10)))


@torch.no_grad()
def evaluate(model: MultiScaleVQVAE, dataset, count: int, batch_size: int = 64) -> dict:
    model.eval()
    totals = {"psnr": 0.0, "l1": 0.0}
    per_scale_psnr = None
    seen = 0
    device = model.quantize.embedding.weight.device
    for start in range(0, min(count, len(dataset)), batch_size):
        images = torch.stack([dataset[i][0] for i in range(start, min(count, len(dataset), start + batch_size))])
        images = images.to(device)
        _, f_hats = model.quantize.quantize(model.encode_latent(images))
        scale_psnr = [psnr(model.decode(f), images) for f in f_hats]
        recon = model.decode(f_hats[-1])
        n = len(images)
        totals["psnr"] += psnr(recon, images) * n
        totals["l1"] += float((recon - images).abs().mean()) * n
        per_scale_psnr = [v * n for v in scale_psnr] if per_scale_psnr is None else [
            a + v * n for a, v in zip(per_scale_psnr, scale_psnr, strict=True)]
        seen += n
    model.train()
    return {"val_psnr": totals["psnr"] / seen, "val_l1": totals["l1"] / seen,
            "val_psnr_per_scale": [v / seen for v in per_scale_psnr]}


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
    preset = get_preset(args.preset)
    torch.manual_seed(args.seed)
    model = MultiScaleVQVAE(preset.tokenizer).to(info.device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
    ema = EMA(model, args.ema) if args.ema > 0 else None
    scaler = loss_scaler(info.device, args.precision)
    train_set, class_names = build_dataset(args.data, "train", preset.tokenizer.image_size, flip=True, seed=args.seed)
    val_set, _ = build_dataset(args.data, "val", preset.tokenizer.image_size)
    usage = CodeUsage(preset.tokenizer.vocab_size)
    reseed_generator = torch.Generator().manual_seed(args.seed + 17)
    step, wall_seconds, reseeded_total = 0, 0.0, 0

    state = run.load_latest()
    if state is not None:
        step, wall_seconds = restore_training_state(state, model, optimizer, ema)
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        usage.hits = state["usage"]
        reseed_generator.set_state(state["reseed_rng"])
        reseeded_total = state["reseeded_total"]
        if info.is_main:
            print(f"resumed from step {step}")

    ddp = DistributedDataParallel(model) if info.distributed else model
    stop_at = args.steps if args.stop_after <= 0 else min(args.steps, step + args.stop_after)
    progress = tqdm(total=args.steps, initial=step, disable=not info.is_main, desc="tokenizer", smoothing=0.1)
    meter = Throughput()
    started = time.perf_counter()

    def checkpoint() -> None:
        if info.is_main:
            run.save(step, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "ema": ema.shadow if ema else None, "usage": usage.hits, "rng": rng_state(),
                "reseed_rng": reseed_generator.get_state(), "step": step, "scaler": scaler.state_dict(),
                "wall_seconds": wall_seconds + time.perf_counter() - started,
                "reseeded_total": reseeded_total, "args": asdict(args),
            })

    while step < stop_at:
        indices = batch_indices(step, len(train_set), args.batch_size, args.seed, info)
        images = torch.stack([train_set[i][0] for i in indices]).to(info.device)
        for group in optimizer.param_groups:
            group["lr"] = warmup_cosine(step, args.steps, args.warmup, args.lr)
        with autocast_context(info.device, args.precision):
            reconstruction, vq_loss, tokens = ddp(images)
        reconstruction = reconstruction.float()
        l1 = (reconstruction - images).abs().mean()
        l2 = F.mse_loss(reconstruction, images)
        loss = args.l1_weight * l1 + args.l2_weight * l2 + args.vq_weight * vq_loss
        scaler.scale(loss).backward()  # the scaler is a pass-through except for fp16
        scaler.unscale_(optimizer)  # clip the true gradients
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        scaler.step(optimizer)  # skipped when fp16 gradients overflowed
        scaler.update()
        optimizer.zero_grad(set_to_none=True)  # free the gradients before the next forward
        if ema is not None:
            ema.update(model)
        usage.add(tokens)
        step += 1
        meter.add(len(images) * info.world_size)

        if args.reseed_every and step % args.reseed_every == 0:
            # NCCL reduces GPU tensors only: the counts travel on the training device
            hits = all_reduce_mean(usage.hits.to(info.device), info).cpu() * info.world_size
            dead = (hits == 0).nonzero().flatten()
            used = float((hits > 0).float().mean())
            count = reseed_dead_codes(model, images, dead, reseed_generator) if info.is_main else 0
            if info.distributed:
                torch.distributed.broadcast(model.quantize.embedding.weight.data, src=0)
            reseeded_total += count
            if info.is_main:
                run.log({"step": step, "codebook_used": used, "dead_codes_reseeded": count})
                tqdm.write(f"step {step}: codebook use {used:.1%}, re-seeded {count} dead codes")
            usage.hits.zero_()

        if step % args.log_every == 0:  # the all-reduce is a collective: every rank must join it
            values = all_reduce_mean(torch.stack([loss.detach(), l1.detach(), l2.detach(), vq_loss.detach()]), info)
        if info.is_main and step % args.log_every == 0:
            record = {"step": step, "loss": float(values[0]), "l1": float(values[1]), "l2": float(values[2]),
                      "vq": float(values[3]), "grad_norm": float(grad_norm), "lr": optimizer.param_groups[0]["lr"],
                      "train_psnr": psnr(reconstruction.detach(), images), "images_per_s": meter.rate()}
            run.log(record)
            progress.set_postfix(loss=f"{record['loss']:.4f}", psnr=f"{record['train_psnr']:.1f}",
                                 ips=f"{record['images_per_s']:.0f}")
        progress.update(1)
        if step % args.save_every == 0 or step == stop_at:
            final_export = step == args.steps and args.export  # the export evaluates once more anyway
            if info.is_main and (step % (args.save_every * 4) == 0 or step == args.steps) and not final_export:
                run.log({"step": step, **evaluate(model, val_set, args.val_size)})
            checkpoint()
    progress.close()

    if step >= args.steps and info.is_main and args.export:
        if ema is not None:
            ema.copy_to(model)
        metrics = evaluate(model, val_set, args.val_size)
        run.log({"step": step, "exported": True, **metrics})
        card = {
            "kind": "tokenizer", "command": command_line(), "steps": step, "batch_size": args.batch_size,
            "wall_seconds": round(wall_seconds + time.perf_counter() - started, 1),
            "dead_codes_reseeded": reseeded_total, "codebook_used_on_val": codebook_use(model, val_set, args.val_size),
            "data": args.data, "class_names": class_names, **metrics,
        }
        save_model(args.export, model.eval(), extra={"class_names": class_names, "card": card}, dtype=torch.float16)
        Path(args.export).with_suffix(".json").write_text(__import__("json").dumps(card, indent=2))
        print(f"exported {args.export}: val PSNR {metrics['val_psnr']:.2f} dB")
    cleanup_distributed()


if __name__ == "__main__":
    main()
