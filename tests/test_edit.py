"""Zero-shot editing (mvar/editing.py): forced tokens, the final blend, seeds and batches, every kind of edit,
bad images and masks, and the command line (mvar/edit.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mvar.checkpoints import save_model
from mvar.config import MVAR_MODE, VAR_MODE, AttentionMode
from mvar.edit import main
from mvar.editing import (
    NothingToEdit,
    edit,
    edit_steps,
    image_pyramid,
    open_image,
    outpaint_mask,
    plan_edit,
    prepare_image,
    prepare_mask,
    token_masks,
)
from mvar.sampling import SamplingConfig, generate_steps

MODES = {"var": VAR_MODE, "mvar": AttentionMode.mvar(refine_step=8, kernel_size=3)}
SAMPLING = SamplingConfig(cfg=1.5, top_k=0, top_p=1.0)


@pytest.fixture(scope="module")
def image(tiny_preset):
    """A smooth test picture of the tiny tokenizer's size, in [0, 1]."""
    size = tiny_preset.tokenizer.image_size
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    return torch.stack([x, y, (x * y).sqrt()]).float()


def square_mask(size: int, left: int, top: int, side: int) -> torch.Tensor:
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[top : top + side, left : left + side] = True
    return mask


@pytest.mark.parametrize("mode", sorted(MODES))
def test_forced_tokens_are_the_images_own_at_every_scale(tiny_tokenizer, tiny_transformer, image, mode):
    mask = square_mask(64, 16, 16, 32)
    plan = plan_edit(tiny_tokenizer, image, mask, batch=2)
    image_tokens = tiny_tokenizer.encode(image[None].mul(2).sub(1))
    steps = list(edit_steps(tiny_transformer, tiny_tokenizer, plan, label=3, seeds=[5, 6], sampling=SAMPLING,
                            mode=MODES[mode]))
    sampled_somewhere = False
    for scale, step in enumerate(steps):
        keep = plan.forced.keep[scale]
        assert torch.equal(step.tokens[keep], image_tokens[scale].expand(2, -1)[keep]), scale
        sampled_somewhere |= bool((step.tokens[~keep] != image_tokens[scale].expand(2, -1)[~keep]).any())
    assert sampled_somewhere  # the masked tokens were sampled, not copied
    # the last scale regenerates what the mask covers, and only that
    last = plan.forced.keep[-1][0].view(16, 16)
    assert not last[4:12, 4:12].any() and last[:4].all() and last[12:].all()


@pytest.mark.parametrize("mode", sorted(MODES))
def test_with_the_final_blend_pixels_outside_the_mask_are_the_reconstruction(tiny_tokenizer, tiny_transformer,
                                                                            image, mode):
    mask = square_mask(64, 8, 24, 20)
    result = edit(tiny_transformer, tiny_tokenizer, image, mask, label=1, seeds=[0, 1], sampling=SAMPLING,
                  mode=MODES[mode])
    outside = ~mask
    reconstruction = tiny_tokenizer.reconstruct(image[None].mul(2).sub(1)).add(1).mul(0.5).clamp(0, 1)
    for i, sample in enumerate(result.images):
        assert torch.equal(sample[:, outside], result.reconstruction[0][:, outside])
        torch.testing.assert_close(sample[:, outside], reconstruction[0][:, outside], atol=1e-5, rtol=0)
        assert torch.equal(sample[:, mask], result.unblended[i][:, mask])
    unblended = edit(tiny_transformer, tiny_tokenizer, image, mask, 1, [0, 1], SAMPLING, MODES[mode],
                     final_blend=False)
    assert torch.equal(unblended.images, result.unblended)


def test_the_masked_region_changes_with_the_seed_and_a_sample_does_not_depend_on_its_batch(
        tiny_tokenizer, tiny_transformer, image):
    mask = square_mask(64, 16, 16, 32)
    together = edit(tiny_transformer, tiny_tokenizer, image, mask, 2, [10, 11, 12], SAMPLING, MVAR_MODE)
    alone = edit(tiny_transformer, tiny_tokenizer, image, mask, 2, [11], SAMPLING, MVAR_MODE)
    for s, t in zip(together.tokens, alone.tokens, strict=True):
        assert torch.equal(s[1], t[0])  # the same tokens: batched convolutions differ only by round-off
    torch.testing.assert_close(together.images[1], alone.images[0], atol=1e-5, rtol=0)
    assert not torch.equal(together.images[0][:, mask], together.images[2][:, mask])


def test_a_full_mask_is_plain_generation_and_an_empty_one_is_nothing_to_edit(tiny_tokenizer, tiny_transformer,
                                                                            image):
    full = torch.ones(64, 64, dtype=torch.bool)
    plan = plan_edit(tiny_tokenizer, image, full, batch=2)
    edited = list(edit_steps(tiny_transformer, tiny_tokenizer, plan, 4, [3, 4], SAMPLING, VAR_MODE))
    plain = list(generate_steps(tiny_transformer, tiny_tokenizer, [4, 4], [3, 4], SAMPLING, VAR_MODE))
    for a, b in zip(edited, plain, strict=True):
        assert torch.equal(a.tokens, b.tokens)
    with pytest.raises(NothingToEdit, match="nothing to edit"):
        plan_edit(tiny_tokenizer, image, torch.zeros(64, 64, dtype=torch.bool))
    with pytest.raises(NothingToEdit):  # one pixel is less than half a token at every scale
        plan_edit(tiny_tokenizer, image, square_mask(64, 30, 30, 1))


def test_outpainting_class_editing_and_variations_run_end_to_end(tiny_tokenizer, tiny_transformer, image):
    keep = outpaint_mask(64, (16, 16, 48, 48))
    assert keep[:16].all() and not keep[16:48, 16:48].any()
    out = edit(tiny_transformer, tiny_tokenizer, image, keep, 0, [0], SAMPLING, MVAR_MODE)
    assert torch.equal(out.images[0][:, ~keep], out.reconstruction[0][:, ~keep])
    region = square_mask(64, 0, 0, 32)
    as_3 = edit(tiny_transformer, tiny_tokenizer, image, region, 3, [7], SAMPLING, VAR_MODE)
    as_9 = edit(tiny_transformer, tiny_tokenizer, image, region, 9, [7], SAMPLING, VAR_MODE)
    assert not torch.equal(as_3.images[0][:, region], as_9.images[0][:, region])
    full = torch.ones(64, 64, dtype=torch.bool)
    variation = edit(tiny_transformer, tiny_tokenizer, image, full, 5, [1, 2], SAMPLING, MVAR_MODE, keep_scales=4)
    image_tokens = tiny_tokenizer.encode(image[None].mul(2).sub(1))
    for scale in range(4):
        assert torch.equal(variation.tokens[scale], image_tokens[scale].expand(2, -1))
    assert not torch.equal(variation.tokens[9][0], variation.tokens[9][1])
    for value, message in ((-1, "keep_scales"), (11, "keep_scales")):
        with pytest.raises(ValueError, match=message):
            plan_edit(tiny_tokenizer, image, full, keep_scales=value)


def test_token_masks_follow_the_area_threshold():
    mask = square_mask(16, 0, 0, 8)  # the top-left quarter
    masks = token_masks(mask, (1, 2, 4), threshold=0.5)
    assert masks[0].tolist() == [[False]]  # a quarter of the only token
    assert masks[1].tolist() == [[True, False, False, False]]
    assert int(masks[2].sum()) == 4
    assert token_masks(mask, (1,), threshold=0.25)[0].tolist() == [[True]]
    with pytest.raises(ValueError, match="threshold"):
        token_masks(mask, (1,), threshold=0)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "RGB", "1", "I;16"])
def test_images_of_any_mode_size_and_aspect_are_fitted_and_the_note_says_so(mode):
    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 255, (48, 80, 3), dtype=np.uint8)).convert(mode)
    prepared = prepare_image(picture, 64)
    assert prepared.pixels.shape == (3, 64, 64) and 0 <= prepared.pixels.min() <= prepared.pixels.max() <= 1
    assert "centre-cropped from 80x48 to 48x48" in prepared.note and "resized from 48x48 to 64x64" in prepared.note
    assert prepared.crop == (16, 0, 64, 48)
    if mode not in ("RGB", "RGBA"):
        assert f"converted from {mode}" in prepared.note
    square = prepare_image(Image.new("RGB", (64, 64), (10, 20, 30)), 64)
    assert square.note == "" and torch.allclose(square.pixels[:, 0, 0], torch.tensor([10, 20, 30]) / 255)


def test_transparent_pixels_go_on_white_and_painted_masks_use_their_alpha():
    rgba = Image.new("RGBA", (64, 64), (255, 0, 0, 0))
    prepared = prepare_image(rgba, 64)
    assert torch.allclose(prepared.pixels, torch.ones(3, 64, 64)) and "transparent" in prepared.note
    layer = Image.new("RGBA", (100, 64), (0, 0, 0, 0))
    layer.paste((255, 255, 255, 255), (18, 0, 50, 32))  # painted over x 18..50 of the original
    mask = prepare_mask(layer, 64, crop=(18, 0, 82, 64))
    assert mask[:32, :32].all() and not mask[32:].any() and not mask[:, 32:].any()
    drawn = Image.new("L", (64, 64), 0)
    drawn.paste(255, (0, 0, 32, 64))
    assert prepare_mask(drawn, 64)[:, :32].all() and not prepare_mask(drawn, 64)[:, 32:].any()
    with pytest.raises(ValueError, match="2-D"):
        prepare_mask(np.zeros((2, 2, 2)), 64)


def test_a_file_that_is_not_an_image_and_an_oversized_image_are_refused_by_name(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    with pytest.raises(ValueError, match="notes.png: not a readable image file"):
        open_image(text)
    big = tmp_path / "big.png"
    Image.new("RGB", (400, 300)).save(big)
    with pytest.raises(ValueError, match="400x300 pixels, over the limit"):
        open_image(big, max_pixels=100_000)
    with pytest.raises(ValueError, match="no such image file"):
        open_image(tmp_path / "absent.png")


def test_the_pyramid_of_an_image_improves_towards_the_last_scale(tiny_tokenizer, image):
    pyramid = image_pyramid(tiny_tokenizer, image)
    assert pyramid.reconstructions.shape == (10, 3, 64, 64) and len(pyramid.psnr) == 10
    assert [t.shape for t in pyramid.tokens] == [(p, p) for p in tiny_tokenizer.cfg.patch_nums]
    last = tiny_tokenizer.reconstruct(image[None].mul(2).sub(1)).add(1).mul(0.5).clamp(0, 1)
    torch.testing.assert_close(pyramid.reconstructions[-1], last[0], atol=1e-5, rtol=0)
    assert all(np.isfinite(pyramid.psnr))


def test_the_command_line_edits_in_both_modes(tmp_path, tiny_tokenizer, tiny_transformer, capsys):
    save_model(tmp_path / "tok.safetensors", tiny_tokenizer)
    save_model(tmp_path / "mvar.safetensors", tiny_transformer)
    Image.fromarray(np.full((50, 70, 3), 128, np.uint8)).save(tmp_path / "in.png")
    mask = Image.new("L", (70, 50), 0)
    mask.paste(255, (10, 0, 40, 30))
    mask.save(tmp_path / "mask.png")
    out = tmp_path / "out"
    common = ["--tokenizer", str(tmp_path / "tok.safetensors"), "--transformer", str(tmp_path / "mvar.safetensors"),
              "--image", str(tmp_path / "in.png"), "--class", "2", "--out", str(out), "--device", "cpu"]
    main([*common, "--mask", str(tmp_path / "mask.png"), "--mode", "both", "--seeds", "0", "1"])
    printed = capsys.readouterr().out
    assert "centre-cropped from 70x50 to 50x50" in printed and "VAR: regenerated" in printed
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["grid.png", "var_class2_seed0.png", "var_class2_seed1.png", "mvar_class2_seed0.png", "mvar_class2_seed1.png"])
    main([*common, "--keep-box", "16", "16", "48", "48", "--mode", "mvar"])
    empty = Image.new("L", (70, 50), 0)
    empty.save(tmp_path / "empty.png")
    with pytest.raises(SystemExit, match="nothing to edit"):
        main([*common, "--mask", str(tmp_path / "empty.png")])
    with pytest.raises(SystemExit, match="class_id|label"):
        main([*common, "--class", "99"])
