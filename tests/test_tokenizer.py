import json
from pathlib import Path

import pytest
import torch

from mvar.config import OFFICIAL_TOKENIZER, TokenizerConfig
from mvar.tokenizer import MultiScaleVQVAE

from .conftest import random_tokens

LAYOUT = json.loads((Path(__file__).parent / "data" / "official_layout.json").read_text())


def test_official_layout_matches_key_for_key():
    with torch.device("meta"):
        model = MultiScaleVQVAE(OFFICIAL_TOKENIZER)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == LAYOUT["tokenizer"]


def test_small_variant_gives_16x16_latent_from_64px(tiny_tokenizer):
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    latent = tiny_tokenizer.encode_latent(images)
    assert latent.shape == (2, tiny_tokenizer.cfg.latent_channels, 16, 16)
    tokens = tiny_tokenizer.encode(images)
    assert [t.shape[1] for t in tokens] == [p * p for p in tiny_tokenizer.patch_nums]


def test_tokens_fhat_and_decode_shapes(tiny_tokenizer):
    tokens = random_tokens(tiny_tokenizer.patch_nums, tiny_tokenizer.cfg.vocab_size, batch=3)
    f_hats = tiny_tokenizer.tokens_to_fhats(tokens)
    assert len(f_hats) == 10 and all(f.shape == (3, 8, 16, 16) for f in f_hats)
    partial = tiny_tokenizer.tokens_to_fhats(tokens[:4])
    assert torch.allclose(partial[-1], f_hats[3])
    images = tiny_tokenizer.decode(f_hats[-1], chunk_size=2)
    assert images.shape == (3, 3, 64, 64) and images.abs().max() <= 1
    # chunked decoding is the same computation as one batch
    assert torch.allclose(images, tiny_tokenizer.decode(f_hats[-1], chunk_size=64), atol=1e-4)


def test_teacher_forcing_inputs_are_downsampled_accumulations(tiny_tokenizer):
    tokens = random_tokens(tiny_tokenizer.patch_nums, tiny_tokenizer.cfg.vocab_size, batch=2, seed=3)
    inputs = tiny_tokenizer.teacher_forcing_inputs(tokens)
    assert inputs.shape == (2, 680 - 1, 8)
    f_hats = tiny_tokenizer.tokens_to_fhats(tokens)
    # scale 2 (3x3) sees the map after scales 0 and 1, area-downsampled to 3x3
    expected = torch.nn.functional.adaptive_avg_pool2d(f_hats[1], 3).flatten(2).transpose(1, 2)
    assert torch.allclose(inputs[:, 4:13], expected, atol=1e-6)


def test_quantize_reproduces_its_own_tokens(tiny_tokenizer):
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    tokens, f_hats = tiny_tokenizer.quantize.quantize(tiny_tokenizer.encode_latent(images))
    rebuilt = tiny_tokenizer.tokens_to_fhats(tokens)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(f_hats, rebuilt, strict=True))


def test_training_forward_has_straight_through_gradient(tiny_preset):
    model = MultiScaleVQVAE(tiny_preset.tokenizer).train()
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    recon, vq_loss, tokens = model(images)
    (recon - images).abs().mean().add(vq_loss).backward()
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0  # through the straight-through estimator
    assert model.quantize.embedding.weight.grad.abs().sum() > 0
    assert model.quantize.quant_resi.qresi_ls[0].weight.grad is not None


def test_bad_inputs_raise_value_errors(tiny_tokenizer):
    with pytest.raises(ValueError, match="expected images"):
        tiny_tokenizer.encode(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="token ids outside"):
        tiny_tokenizer.tokens_to_fhats([torch.full((1, 1), 10_000)])
    with pytest.raises(ValueError, match="tokens must be"):
        tiny_tokenizer.tokens_to_fhats([torch.zeros(1, 2, dtype=torch.long)])
    with pytest.raises(ValueError, match="last scale"):
        TokenizerConfig(image_size=64, channel_mult=(1, 1, 2, 2, 4))  # 64/16 = 4 != 16
    with pytest.raises(ValueError, match="strictly increasing"):
        TokenizerConfig(patch_nums=(1, 2, 2, 16))


def test_shipped_tokenizer_error_falls_monotonically_with_more_scales():
    """On held-out images (the shipped dataset samples), decoding the first s scales gets closer to the
    image as s grows."""
    import numpy as np
    from PIL import Image

    from mvar.checkpoints import load_model

    assets = Path(__file__).parent.parent / "assets"
    tokenizer = load_model(assets / "tokenizer.safetensors", expect="tokenizer").model
    grid = np.asarray(Image.open(assets / "dataset_samples.png").convert("RGB"))
    cells = [grid[row * 64:(row + 1) * 64, :64] for row in range(8)]  # the first sample of 8 classes
    images = torch.from_numpy(np.stack(cells)).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        _, f_hats = tokenizer.quantize.quantize(tokenizer.encode_latent(images))
        errors = [float((tokenizer.decode(f) - images).square().mean()) for f in f_hats]
    assert all(later < earlier for earlier, later in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] < 0.25 * errors[0]
