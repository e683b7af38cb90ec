"""ImageNet-layout folders and the token cache."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from train.data import ImageFolderDataset, balanced_images, build_dataset, token_cache

from .tiny_data import CLASS_NAMES


def make_folder(root, split="train"):
    for label, name in enumerate(["n01", "n02"]):
        folder = root / split / name
        folder.mkdir(parents=True)
        for i in range(3):
            array = np.full((40 + 10 * i, 80, 3), 60 * label + i, np.uint8)
            Image.fromarray(array).save(folder / f"img{i}.JPEG" if i else folder / f"img{i}.png")
        (folder / "notes.txt").write_text("not an image")


def test_image_folder_layout_resize_crop_and_class_names(tmp_path):
    make_folder(tmp_path)
    dataset = ImageFolderDataset(tmp_path, "train", image_size=32)
    assert len(dataset) == 6 and dataset.classes == ["n01", "n02"] and dataset.class_names == ["n01", "n02"]
    image, label = dataset[4]
    assert image.shape == (3, 32, 32) and label == 1 and image.min() >= -1 and image.max() <= 1
    (tmp_path / "class_names.json").write_text(json.dumps({"n01": "tench", "n02": "goldfish"}))
    _, names = build_dataset(str(tmp_path), "train", 32, flip=True)
    assert names == ["tench", "goldfish"]


def test_missing_split_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="expected ImageNet layout"):
        ImageFolderDataset(tmp_path, "val", image_size=32)


def test_a_dataset_that_carries_its_own_flips_gets_no_random_ones(tmp_path):
    make_folder(tmp_path)
    flipping = ImageFolderDataset(tmp_path, "train", image_size=32, flip=True)
    assert flipping.flip
    (tmp_path / "dataset.json").write_text(json.dumps({"random_flip": False}))
    assert not ImageFolderDataset(tmp_path, "train", image_size=32, flip=True).flip


def test_balanced_draws_take_each_class_alike_and_skips_make_them_disjoint(image_folder):
    dataset = ImageFolderDataset(image_folder, "train", image_size=64)
    first, labels = balanced_images(dataset, per_class=3, seed=1)
    assert first.shape == (36, 3, 64, 64) and torch.bincount(labels).tolist() == [3] * len(CLASS_NAMES)
    again, _ = balanced_images(dataset, per_class=3, seed=1)
    assert torch.equal(first, again)
    rest, _ = balanced_images(dataset, per_class=5, seed=1, skip=3)
    assert rest.shape[0] == 5 * len(CLASS_NAMES)
    drawn = {x.numpy().tobytes() for x in first}
    assert len(drawn) == len(first) and not drawn & {x.numpy().tobytes() for x in rest}


def test_token_cache_is_reused_and_invalidated_by_a_new_tokenizer(tmp_path, tiny_tokenizer, image_folder):
    from mvar.checkpoints import save_model

    path = tmp_path / "tok.safetensors"
    save_model(path, tiny_tokenizer)
    data = ImageFolderDataset(image_folder, "val", image_size=64)
    tokens, labels = token_cache(tiny_tokenizer, path, data, tmp_path / "cache", "val", log=lambda *_: None)
    assert tokens.shape == (len(data), 680) and labels.tolist() == [item[1] for item in data.items]
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1
    tiny_tokenizer.encode = None  # a reuse must not encode again: calling this would raise
    try:
        again, _ = token_cache(tiny_tokenizer, path, data, tmp_path / "cache", "val", log=lambda *_: None)
    finally:
        del tiny_tokenizer.encode  # the class's method again
    assert torch.equal(again, tokens)
    save_model(path, tiny_tokenizer, extra={"changed": True})  # unchanged weights, but a rewritten file
    token_cache(tiny_tokenizer, path, data, tmp_path / "cache", "val", log=lambda *_: None)
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2  # a new file digest means a new cache
