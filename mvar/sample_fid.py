"""FID-ready sampling: N images per class for every class, as PNGs and one ``.npz`` for OpenAI's ADM evaluator.

    python -m mvar.sample_fid --tokenizer models/vae_ch160v4096z32.pth --transformer models/mvar-d16.pth \\
        --mode mvar --out fid/mvar-d16                          # 50 per class x 1000 classes, suggested settings
    torchrun --nproc_per_node 8 -m mvar.sample_fid ...         # the same, sharded over 8 ranks

Sample i (0 <= i < N) has class ``classes[i // per_class]`` and seed ``seed + i``; our sampler gives every
sample its own generator, so an image depends on nothing but its index: not on the rank that draws it,
nor on its batch. Rank r draws the indices i with i % world_size == r. Every PNG is written atomically
(temp file, then rename), so a killed run, rerun with the same command, draws only the missing indices:
no duplicates and no gaps. ``run.json`` records the settings; a rerun with other settings is refused. At
the end rank 0 gathers ``samples.npz``: ``arr_0`` uint8 (N, H, W, 3) in index order, and ``labels``.

Settings: flags, else the official suggested settings of a file named as the official release (mvar-d16.pth,
var_d20.pth, ...), else the file's own sampling defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .checkpoints import OFFICIAL_SAMPLING, CheckpointError, load_any, official_name_of
from .config import VAR_MODE, AttentionMode
from .devices import DEVICE_HELP, DTYPES, distributed_device, resolve_device
from .files import ASSETS, atomic_write, atomic_write_bytes
from .sampling import SamplingConfig, decode_to_unit, generate_steps

FALLBACK_SAMPLING = {"cfg": 1.5, "top_p": 0.96, "top_k": 900}  # VAR's README


@dataclass(frozen=True)
class RunSettings:
    """Everything that decides the images; a resumed run must match it exactly."""

    tokenizer: str
    transformer: str
    mode: str
    refine_step: int
    kernel_size: int
    classes: tuple[int, ...]
    per_class: int
    seed: int
    cfg: float
    top_k: int
    top_p: float
    dtype: str

    @property
    def total(self) -> int:
        return len(self.classes) * self.per_class

    def label(self, index: int) -> int:
        return self.classes[index // self.per_class]


def sampling_settings(args, transformer_extra: dict) -> dict:
    """cfg / top_k / top_p: flags first, then the official suggestion for the file's name, then the file's own."""
    official = OFFICIAL_SAMPLING.get(official_name_of(args.transformer) or "")
    defaults = official or {**FALLBACK_SAMPLING, **transformer_extra.get("sampling_defaults", {})}
    chosen = {name: getattr(args, name) for name in ("cfg", "top_k", "top_p")}
    return {name: (value if value is not None else defaults[name]) for name, value in chosen.items()}


def image_path(folder: Path, index: int) -> Path:
    return folder / f"{index:06d}.png"


def save_png(image: np.ndarray, path: Path) -> None:
    """Write atomically: a killed run never leaves a half image under a final name."""
    atomic_write(path, lambda tmp: Image.fromarray(image).save(tmp, format="PNG"))


def missing_indices(folder: Path, settings: RunSettings, rank: int, world: int) -> list[int]:
    return [i for i in range(rank, settings.total, world) if not image_path(folder, i).exists()]


def check_or_record_settings(out: Path, settings: RunSettings) -> None:
    """Record the run's settings, or refuse a folder whose run had others (its images would mix)."""
    record = out / "run.json"
    wanted = json.loads(json.dumps(asdict(settings)))
    if record.exists():
        found = json.loads(record.read_text())
        if found != wanted:
            changed = sorted(k for k in set(found) | set(wanted) if found.get(k) != wanted.get(k))
            raise ValueError(f"{out} holds a run with other settings ({', '.join(changed)} differ); use another "
                             "--out, or the same flags to resume it")
        return
    atomic_write_bytes(record, json.dumps(wanted, indent=2).encode())


def gather_npz(out: Path, settings: RunSettings) -> Path:
    """All PNGs, in index order, into ``samples.npz`` (arr_0: uint8 N x H x W x 3; labels: N)."""
    folder = out / "images"
    missing = [i for i in range(settings.total) if not image_path(folder, i).exists()]
    if missing:
        raise ValueError(f"{len(missing)} of {settings.total} images are missing (first: {missing[:5]}); rerun the "
                         "same command to draw them")
    images = np.stack([np.asarray(Image.open(image_path(folder, i)).convert("RGB")) for i in range(settings.total)])
    labels = np.array([settings.label(i) for i in range(settings.total)], dtype=np.int64)
    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:  # a path without .npz would get one appended
            np.savez(handle, arr_0=images, labels=labels)

    return atomic_write(out / "samples.npz", write)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m mvar.sample_fid", description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer", default=str(ASSETS / "tokenizer.safetensors"))
    parser.add_argument("--transformer", default=str(ASSETS / "mvar.safetensors"))
    parser.add_argument("--mode", choices=["var", "mvar"], default="mvar")
    parser.add_argument("--per-class", type=int, default=50, help="images per class (default 50, as for FID-50k)")
    parser.add_argument("--classes", type=int, nargs="+", default=None, help="class ids (default: every class)")
    parser.add_argument("--seed", type=int, default=0, help="sample i uses seed + i")
    parser.add_argument("--cfg", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass on each rank")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--device", default="auto", help=f"where to run: {DEVICE_HELP} (default auto)")
    parser.add_argument("--out", required=True, help="run folder: images/, run.json, samples.npz")
    args = parser.parse_args(argv)
    if args.per_class < 1:
        parser.error(f"--per-class must be at least 1, got {args.per_class}")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    return args


def _distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) for a plain process."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def main(argv=None) -> None:
    args = parse_args(argv)
    rank, world, local_rank = _distributed()
    try:
        device = distributed_device(args.device, local_rank) if world > 1 else resolve_device(args.device)
    except ValueError as err:
        sys.exit(f"error: {err}")
    if world > 1:
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        run(args, rank, world, device)
    except (CheckpointError, ValueError) as err:
        sys.exit(f"error: {err}")
    finally:
        if world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def run(args, rank: int, world: int, device: torch.device) -> None:
    tokenizer = load_any(args.tokenizer, "tokenizer", device=device).model.eval().requires_grad_(False)
    loaded = load_any(args.transformer, "transformer", device=device)
    transformer = loaded.model.eval().requires_grad_(False)
    mode = VAR_MODE if args.mode == "var" else AttentionMode.mvar_from_extra(loaded.extra)
    classes = tuple(args.classes) if args.classes is not None else tuple(range(transformer.cfg.num_classes))
    bad = [c for c in classes if not 0 <= c < transformer.cfg.num_classes]
    if bad:
        raise ValueError(f"--classes {bad} out of range 0..{transformer.cfg.num_classes - 1}")
    chosen = sampling_settings(args, loaded.extra)
    settings = RunSettings(str(Path(args.tokenizer).resolve()), str(Path(args.transformer).resolve()), args.mode,
                           mode.refine_step, mode.kernel_size, classes, args.per_class, args.seed,
                           float(chosen["cfg"]), int(chosen["top_k"]), float(chosen["top_p"]), args.dtype)
    sampling = SamplingConfig(cfg=settings.cfg, top_k=settings.top_k, top_p=settings.top_p).validate(
        transformer.cfg.vocab_size)
    out = Path(args.out)
    if rank == 0:
        check_or_record_settings(out, settings)
        (out / "images").mkdir(parents=True, exist_ok=True)
    _barrier(world)
    if rank != 0:
        check_or_record_settings(out, settings)  # recorded by rank 0: now a check
    folder = out / "images"
    todo = missing_indices(folder, settings, rank, world)
    done_before = len(range(rank, settings.total, world)) - len(todo)
    if rank == 0:
        print(f"{settings.total} images ({len(classes)} classes x {args.per_class}), {mode.name}, cfg {settings.cfg} "
              f"top-k {settings.top_k} top-p {settings.top_p}, {world} rank(s) on {device}; this rank: "
              f"{done_before} already done, {len(todo)} to draw", flush=True)
    draw(transformer, tokenizer, settings, sampling, mode, todo, folder, args.batch_size, show=rank == 0)
    _barrier(world)
    if rank == 0:
        target = gather_npz(out, settings)
        print(f"wrote {target} ({settings.total} images)")


def draw(transformer, tokenizer, settings: RunSettings, sampling: SamplingConfig, mode: AttentionMode,
         indices: list[int], folder: Path, batch_size: int, show: bool) -> None:
    """Generate and save the images of ``indices``, a batch at a time, with a progress bar and throughput."""
    from tqdm import tqdm

    from .tokenizer import to_uint8

    dtype = DTYPES[settings.dtype]
    started = time.perf_counter()
    with tqdm(total=len(indices), unit="img", disable=not show, file=sys.stdout) as bar:
        for begin in range(0, len(indices), batch_size):
            batch = indices[begin : begin + batch_size]
            labels = [settings.label(i) for i in batch]
            seeds = [settings.seed + i for i in batch]
            steps = list(generate_steps(transformer, tokenizer, labels, seeds, sampling, mode, dtype=dtype,
                                        max_batch=len(batch)))
            images = to_uint8(decode_to_unit(tokenizer, steps[-1].f_hat.to(tokenizer.quant_conv.weight.dtype)))
            for index, image in zip(batch, images, strict=True):
                save_png(image, image_path(folder, index))
            bar.update(len(batch))
            bar.set_postfix(img_per_s=f"{bar.n / (time.perf_counter() - started):.2f}")


if __name__ == "__main__":
    main()
