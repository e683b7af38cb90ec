"""Reference outputs of the official VAR and MVAR code on tiny random weights (issue #10).

``tests/test_official_reference.py`` recomputes every output written here with our code. Nothing of the
official code is copied into this repository: this script imports it from checkouts given on the command
line, one subprocess per repository (both name their packages ``models`` and ``utils``), and writes only
tensors. It needs its own virtual environment (the official code imports natten, einops, huggingface_hub),
separate from the project's; from the repository root:

    mkdir -p /tmp/src/VAR /tmp/src/MVAR
    git --git-dir=<VAR clone>/.git archive HEAD | tar -x -C /tmp/src/VAR     # github FoundationVision/VAR
    git --git-dir=<MVAR clone>/.git archive HEAD | tar -x -C /tmp/src/MVAR   # github CVL-UESTC/MVAR
    python3 -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install torch==2.13.0 natten==0.21.7 einops huggingface_hub numpy pillow safetensors
    /tmp/refvenv/bin/python -m tests.make_official_reference --var-src /tmp/src/VAR --mvar-src /tmp/src/MVAR

It runs on a CPU in about a minute (NATTEN 0.21.7 runs ``na2d`` there through its flex-attention backend).

What is written to ``--out`` (default ``tests/data``):

* ``official_reference_weights.safetensors``: one set of random weights in the official layout, shared by
  VAR and MVAR (their parameters are the same): the transformer's state dict (keys as in ``var_d16.pth``,
  less the 680 x 680 training mask) and the VQ-VAE quantizer's (keys ``quantize.*``). Float weights are
  random values that float8 (e4m3) represents exactly, stored in that dtype to keep the file small; both
  sides upcast them to fp32 and compute in fp32.
* ``official_reference_var.safetensors`` / ``official_reference_mvar.safetensors``: each official model's
  training mask (as the [begin, end) run of attended keys of every row, after checking that every row is
  one run of zeros among -inf), teacher-forced inputs and logits, and greedy (top_k=1) generations.
  The metadata (one JSON entry, ``reference``) records the configuration, the smallest logit gap behind
  every greedy choice and nearest-code choice (the script refuses a seed where a tie could decide a token),
  and the sha256 of every official file imported. A rerun writes the same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent

# The tiny configuration. The official VQ-VAE fixes ch_mult (1, 1, 2, 2, 4), so 256 px gives the 16x16 latent.
CONFIG = {
    "vocab_size": 16, "latent_channels": 8, "channels": 32, "image_size": 256,
    "depth": 2, "width": 64, "num_heads": 2, "num_classes": 10,
    "patch_nums": [1, 2, 3, 4, 5, 6, 8, 10, 13, 16], "refine_step": 8, "kernel_size": 7,
}
SEED = 20260417
TEACHER_LABELS = [3, 7]
GENERATION_LABELS = [1, 8]
GENERATION_SEED = 0
GUIDANCE = [1.0, 2.5]  # cfg == 1 and cfg != 1: the official MVAR sampler treats 1.0 as "no guidance"
WEIGHT_DTYPE = torch.float8_e4m3fn
JOINT_SCALES = range(0, CONFIG["refine_step"])  # MVAR's joint block, trained with the block-diagonal mask
WINDOWED_SCALES = range(CONFIG["refine_step"], len(CONFIG["patch_nums"]))  # each trained alone, with NATTEN


def scale_spans(patch_nums: list[int]) -> list[tuple[int, int]]:
    """[begin, end) of every scale in the flat sequence."""
    ends = [sum(p * p for p in patch_nums[: i + 1]) for i in range(len(patch_nums))]
    return list(zip([0] + ends[:-1], ends, strict=True))


# ---------------------------------------------------------------------------------------------
# Random weights
# ---------------------------------------------------------------------------------------------


def weight_std(name: str) -> float:
    """Spread of one tensor's random values: large enough that every block and every branch matters."""
    if name.startswith("quantize.embedding"):
        return 0.5
    if name == "head.weight":
        return 0.5  # logits spread ~4: greedy choices are clear, not near-ties
    if name.endswith(".bias"):
        return 0.05
    if name.startswith("class_emb"):
        return 0.5
    return 0.1


def random_weights(shapes: dict[str, tuple[int, ...]], width: int, seed: int) -> dict[str, torch.Tensor]:
    """Float8-representable random values for every tensor: {name: fp32 tensor}.

    The AdaLN gammas get a bias around 0.5 (the official init puts them near 0, which would make the
    blocks almost the identity and hide differences); log-temperatures lie in [ln 2, ln 20].
    """
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for name in sorted(shapes):
        shape = shapes[name]
        if name.endswith("zero_k_bias") or name == "quantize.ema_vocab_hit_SV":
            values = torch.zeros(shape)  # keys have no bias; hit counts are a training statistic
        elif name.endswith("scale_mul_1H11"):
            values = torch.empty(shape).uniform_(math.log(2), math.log(20), generator=generator)
        else:
            values = torch.randn(shape, generator=generator) * weight_std(name)
            if name.startswith("blocks.") and name.endswith("ada_lin.1.bias"):
                values[: 2 * width] += 0.5  # gamma1, gamma2
        weights[name] = values.to(WEIGHT_DTYPE).float()
    return weights


# ---------------------------------------------------------------------------------------------
# Masks as runs of attended keys
# ---------------------------------------------------------------------------------------------


def mask_to_runs(bias: torch.Tensor) -> torch.Tensor:
    """Official additive mask (1, 1, L, L) of 0 / -inf -> (L, 2) int16 [begin, end) of each row's zeros.

    Refuses a mask with other values or a row whose zeros are not one contiguous run.
    """
    bias = bias.reshape(bias.shape[-2], bias.shape[-1])
    allowed = bias == 0
    if not bool((allowed | (bias == float("-inf"))).all()):
        raise ValueError("the mask holds values other than 0 and -inf")
    runs = []
    for row in allowed:
        columns = row.nonzero().flatten()
        begin, end = int(columns[0]), int(columns[-1]) + 1
        if end - begin != len(columns):
            raise ValueError("a row of the mask attends to more than one run of keys")
        runs.append((begin, end))
    return torch.tensor(runs, dtype=torch.int16)


# ---------------------------------------------------------------------------------------------
# Recording what the official samplers choose
# ---------------------------------------------------------------------------------------------


class SamplerRecorder:
    """Wraps the official ``sample_with_top_k_top_p_``: records the chosen tokens and the greedy margin."""

    def __init__(self, sample):
        self.sample = sample
        self.tokens: list[torch.Tensor] = []
        self.min_gap = math.inf

    def __call__(self, logits, *args, **kwargs):
        top2 = logits.float().topk(2, dim=-1).values  # before the official code masks logits in place
        self.min_gap = min(self.min_gap, float((top2[..., 0] - top2[..., 1]).min()))
        chosen = self.sample(logits, *args, **kwargs)
        self.tokens.append(chosen[:, :, 0].clone())
        return chosen


def nearest_code_gap(quantize, latent: torch.Tensor, tokens: list[torch.Tensor], f_hats: list[torch.Tensor]
                     ) -> float:
    """Smallest gap between the nearest and second-nearest code over every scale's residual."""
    side = latent.shape[-1]
    codebook = quantize.embedding.weight.float()
    residual = latent.clone()
    gap = math.inf
    previous = torch.zeros_like(latent)
    for f_hat, scale_tokens in zip(f_hats, tokens, strict=True):
        pn = round(scale_tokens.shape[1] ** 0.5)
        small = torch.nn.functional.interpolate(residual, size=(pn, pn), mode="area") if pn != side else residual
        vectors = small.permute(0, 2, 3, 1).reshape(-1, codebook.shape[1])
        distances = torch.cdist(vectors, codebook).square().sort(dim=1).values
        gap = min(gap, float((distances[:, 1] - distances[:, 0]).min()))
        residual = residual - (f_hat - previous)
        previous = f_hat
    return gap


# ---------------------------------------------------------------------------------------------
# Workers: one per official repository, each in its own process
# ---------------------------------------------------------------------------------------------


def import_official(src: Path):
    """Put one official checkout first on sys.path and import its packages."""
    sys.path.insert(0, str(src))
    import models.vqvae as vqvae  # resolved from the checkout just added

    return vqvae


def official_file_digests(src: Path) -> dict[str, str]:
    """sha256 of every file of the checkout that this process imported."""
    digests = {}
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if path and Path(path).resolve().is_relative_to(src.resolve()):
            relative = str(Path(path).resolve().relative_to(src.resolve()))
            digests[relative] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return dict(sorted(digests.items()))


def build_vqvae(vqvae_module):
    torch.manual_seed(SEED)  # encoder / decoder weights: unused by the comparisons, but deterministic
    return vqvae_module.VQVAE(
        vocab_size=CONFIG["vocab_size"], z_channels=CONFIG["latent_channels"], ch=CONFIG["channels"],
        test_mode=True, share_quant_resi=4, v_patch_nums=tuple(CONFIG["patch_nums"]),
    ).eval()


def transformer_kwargs() -> dict:
    """The official constructors' arguments for the tiny model; label dropout off, no fused kernels."""
    return dict(
        num_classes=CONFIG["num_classes"], depth=CONFIG["depth"], embed_dim=CONFIG["width"],
        num_heads=CONFIG["num_heads"], mlp_ratio=4.0, drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0,
        norm_eps=1e-6, shared_aln=False, cond_drop_rate=0.0, attn_l2_norm=True,
        patch_nums=tuple(CONFIG["patch_nums"]), flash_if_available=False, fused_if_available=False,
    )


def load_into(model, vae, weights: dict[str, torch.Tensor]) -> None:
    """Strictly load the shared weights; the model keeps its own lvl_1L and training mask."""
    own = model.state_dict()
    transformer = {k: v for k, v in weights.items() if not k.startswith("quantize.")}
    model.load_state_dict({**own, **transformer}, strict=True)
    quantizer = {k.removeprefix("quantize."): v for k, v in weights.items() if k.startswith("quantize.")}
    vae.quantize.load_state_dict(quantizer, strict=True)


def teacher_tokens() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(SEED + 1)
    return [torch.randint(0, CONFIG["vocab_size"], (len(TEACHER_LABELS), p * p), generator=generator)
            for p in CONFIG["patch_nums"]]


def record_generation(module, sample_name: str, run) -> tuple[torch.Tensor, float]:
    """Run an official generation with its sampler wrapped: (tokens (B, L) of all scales, smallest gap)."""
    recorder = SamplerRecorder(getattr(module, sample_name))
    setattr(module, sample_name, recorder)
    try:
        run()
    finally:
        setattr(module, sample_name, recorder.sample)
    return torch.cat(recorder.tokens, dim=1), recorder.min_gap


def fhat_recorder(quantize) -> list[torch.Tensor]:
    """Record f_hat after each scale of an official generation (wraps get_next_autoregressive_input)."""
    seen: list[torch.Tensor] = []
    original = quantize.get_next_autoregressive_input

    def recording(si, num_scales, f_hat, h_BChw):
        out = original(si, num_scales, f_hat, h_BChw)
        seen.append(out[0].clone())
        return out

    quantize.get_next_autoregressive_input = recording
    return seen


def var_worker(src: Path, work: Path) -> None:
    """Official VAR: weights, quantizer check, teacher-forced logits, greedy generations."""
    vqvae = import_official(src)
    import models.var as var_module

    vae = build_vqvae(vqvae)
    model = var_module.VAR(vae, **transformer_kwargs()).eval()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in ("lvl_1L", "attn_bias_for_masking")}
    shapes.update({f"quantize.{k}": tuple(v.shape) for k, v in vae.quantize.state_dict().items()})
    weights = random_weights(shapes, CONFIG["width"], SEED)
    load_into(model, vae, weights)
    out, meta = {}, {}

    # quantizer: a random latent -> tokens and f_hat per scale
    latent = torch.randn(1, CONFIG["latent_channels"], 16, 16, generator=torch.Generator().manual_seed(SEED + 2))
    with torch.no_grad():
        q_tokens = vae.quantize.f_to_idxBl_or_fhat(latent, to_fhat=False)
        q_fhats = vae.quantize.f_to_idxBl_or_fhat(latent, to_fhat=True)
    out["quantize_latent"] = latent
    out["quantize_tokens"] = torch.cat(q_tokens, dim=1).to(torch.uint8)
    out["quantize_fhat"] = q_fhats[-1]
    meta["quantize_min_code_gap"] = nearest_code_gap(vae.quantize, latent, q_tokens, q_fhats)

    # teacher forcing
    tokens = teacher_tokens()
    labels = torch.tensor(TEACHER_LABELS)
    with torch.no_grad():
        inputs = vae.quantize.idxBl_to_var_input(tokens)
        out["teacher_logits"] = model(labels, inputs)
    out["teacher_labels"] = labels
    out["teacher_tokens"] = torch.cat(tokens, dim=1).to(torch.uint8)
    out["teacher_inputs"] = inputs

    # greedy generation; the official VAR applies its guidance ramp at any cfg, 1.0 included
    for cfg in GUIDANCE:
        fhats = fhat_recorder(vae.quantize)
        gen_tokens, gap = record_generation(var_module, "sample_with_top_k_top_p_", lambda cfg=cfg: (
            model.autoregressive_infer_cfg(B=len(GENERATION_LABELS), label_B=torch.tensor(GENERATION_LABELS),
                                           g_seed=GENERATION_SEED, cfg=cfg, top_k=1, top_p=0.0)))
        out[f"generate_cfg{cfg}_tokens"] = gen_tokens.to(torch.uint8)
        out[f"generate_cfg{cfg}_fhat"] = fhats[-1]
        meta[f"generate_cfg{cfg}_min_logit_gap"] = gap
    out["generate_labels"] = torch.tensor(GENERATION_LABELS)

    out["attn_bias_for_masking_runs"] = mask_to_runs(model.attn_bias_for_masking)
    out["lvl_1L"] = model.lvl_1L.clone()
    meta["official_files"] = official_file_digests(src)
    save_file({k: v.to(WEIGHT_DTYPE) for k, v in weights.items()}, str(work / "weights.safetensors"))
    save_file({k: v.contiguous() for k, v in out.items()}, str(work / "var.safetensors"),
              metadata={"meta": json.dumps(meta)})


def mvar_worker(src: Path, work: Path) -> None:
    """Official MVAR on the same weights: joint-block and windowed teacher forcing, greedy generations."""
    warnings.filterwarnings("ignore", module=r"torch\.nn\.attention\.flex_attention")  # NATTEN's CPU path
    vqvae = import_official(src)
    import models.mvar as mvar_module

    vae = build_vqvae(vqvae)
    model = mvar_module.MVAR(vae, **transformer_kwargs(), kernel_size=CONFIG["kernel_size"],
                             refine_step=CONFIG["refine_step"]).eval()
    weights = {k: v.float() for k, v in load_file(str(work / "weights.safetensors")).items()}
    load_into(model, vae, weights)
    var_reference = load_file(str(work / "var.safetensors"))
    out, meta = {}, {}

    spans = scale_spans(CONFIG["patch_nums"])
    first = spans[0][1]  # tokens of scale 0, which has no input row
    tokens = teacher_tokens()
    labels = torch.tensor(TEACHER_LABELS)
    with torch.no_grad():
        inputs = vae.quantize.idxBl_to_mvar_input(tokens)
        # the official trainer's calls: the joint block from position 0, each windowed scale alone with NATTEN
        joint_end = spans[JOINT_SCALES[-1]][1]
        out["teacher_logits_joint"] = model(label_B=labels, x_BlCv_wo_first_l=inputs[:, : joint_end - first],
                                            L_bg=0, L_ed=joint_end, using_nattn=False)
        for scale in WINDOWED_SCALES:
            begin, end = spans[scale]
            out[f"teacher_logits_scale{scale}"] = model(label_B=labels, x_BlCv_wo_first_l=inputs[:, begin - first:
                                                        end - first], L_bg=begin, L_ed=end, using_nattn=True)
    meta["teacher_inputs_max_diff_to_var"] = float((inputs - var_reference["teacher_inputs"]).abs().max())

    # greedy generation; the official MVAR runs no unconditional branch at cfg == 1.0
    for cfg in GUIDANCE:
        returned: list[torch.Tensor] = []  # autoregressive_infer returns f_hat

        def run(cfg=cfg, returned=returned):
            returned.append(model.autoregressive_infer(
                B=len(GENERATION_LABELS), label_B=torch.tensor(GENERATION_LABELS), g_seed=GENERATION_SEED,
                cfg=cfg, top_k=1, top_p=0.0))

        gen_tokens, gap = record_generation(mvar_module, "sample_with_top_k_top_p_", run)
        out[f"generate_cfg{cfg}_tokens"] = gen_tokens.to(torch.uint8)
        out[f"generate_cfg{cfg}_fhat"] = returned[0]
        meta[f"generate_cfg{cfg}_min_logit_gap"] = gap

    out["attn_bias_for_masking_runs"] = mask_to_runs(model.attn_bias_for_masking)
    if not torch.equal(model.lvl_1L, var_reference["lvl_1L"]):
        raise ValueError("official MVAR and VAR disagree on lvl_1L")
    meta["official_files"] = official_file_digests(src)
    save_file({k: v.contiguous() for k, v in out.items()}, str(work / "mvar.safetensors"),
              metadata={"meta": json.dumps(meta)})


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------

# A greedy or nearest-code choice closer than this could flip within the tests' logit tolerance (1e-4 per
# logit, so 2e-4 per gap): the script refuses such a seed.
MIN_GAP = 2.5e-4


def run_worker(kind: str, src: Path, work: Path) -> None:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--src", str(src), "--work", str(work)]
    subprocess.run(command, check=True)


def check_gaps(meta: dict, what: str) -> None:
    for key, gap in meta.items():
        if key.endswith("_gap"):
            print(f"{what}: {key} = {gap:.2e}")
        if key.endswith("_gap") and gap < MIN_GAP:
            raise SystemExit(f"{what}: {key} = {gap:.2e} < {MIN_GAP}: a tie could decide a token; change SEED")


def write_outputs(work: Path, out: Path) -> list[Path]:
    """Copy the workers' tensors to the final files, with the configuration in the metadata."""
    out.mkdir(parents=True, exist_ok=True)
    weights = load_file(str(work / "weights.safetensors"))
    var_out = load_file(str(work / "var.safetensors"))
    written = [out / "official_reference_weights.safetensors"]
    about = {"config": CONFIG, "seed": SEED, "made_by": "python -m tests.make_official_reference"}
    var_out_lvl = var_out.pop("lvl_1L")
    # one metadata entry of sorted JSON: safetensors orders several entries arbitrarily, and a rerun should
    # write the same bytes
    save_file({**weights, "lvl_1L": var_out_lvl}, str(written[0]),
              metadata={"reference": json.dumps(about, sort_keys=True)})
    for kind in ("var", "mvar"):
        tensors = var_out if kind == "var" else load_file(str(work / "mvar.safetensors"))
        with safe_open(str(work / f"{kind}.safetensors"), framework="pt") as handle:
            meta = json.loads(handle.metadata()["meta"])
        check_gaps(meta, kind)
        target = out / f"official_reference_{kind}.safetensors"
        save_file(tensors, str(target), metadata={"reference": json.dumps({**about, **meta}, sort_keys=True)})
        written.append(target)
    return written


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--var-src", type=Path, help="checkout of github FoundationVision/VAR")
    parser.add_argument("--mvar-src", type=Path, help="checkout of github CVL-UESTC/MVAR")
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "data")
    parser.add_argument("--worker", choices=["var", "mvar"], help=argparse.SUPPRESS)
    parser.add_argument("--src", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    if args.worker:
        (var_worker if args.worker == "var" else mvar_worker)(args.src, args.work)
        return
    if not (args.var_src and args.mvar_src):
        parser.error("--var-src and --mvar-src are required")
    for src in (args.var_src, args.mvar_src):
        if not (src / "models" / "quant.py").is_file():
            parser.error(f"{src} is not a checkout of the official code (no models/quant.py)")
    with tempfile.TemporaryDirectory(prefix="official-reference-") as tmp:
        work = Path(tmp)
        run_worker("var", args.var_src, work)
        run_worker("mvar", args.mvar_src, work)
        for path in write_outputs(work, args.out):
            print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
