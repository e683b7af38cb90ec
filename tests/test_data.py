"""ImageNet-layout folders and the token cache."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from train.data import ImageFolderDataset, build_dataset, token_cache


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
    _, names = build_dataset(str(tmp_path), "train", 32, size=0, seed=0, flip=True)
    assert names == ["tench", "goldfish"]


def test_missing_split_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="expected ImageNet layout"):
        ImageFolderDataset(tmp_path, "val", image_size=32)


def test_token_cache_is_reused_and_invalidated_by_a_new_tokenizer(tmp_path, tiny_tokenizer):
    from mvar.checkpoints import save_model
    from train.embedded_data import EmbeddedDataset

    path = tmp_path / "tok.safetensors"
    save_model(path, tiny_tokenizer)
    data = EmbeddedDataset("val", size=4)
    tokens, labels = token_cache(tiny_tokenizer, path, data, tmp_path / "cache", "val", log=lambda *_: None)
    assert tokens.shape == (4, 680) and labels.tolist() == [0, 1, 2, 3]
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
