"""Tests for the procedurally drawn training set (train/embedded_data.py)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from train import embedded_data as ed

N = ed.NUM_CLASSES


@pytest.fixture(scope="module")
def per_class_images() -> np.ndarray:
    """(classes, 48, 64, 64, 3) float32 val images in [0, 1], shared by the statistics tests (~0.3 s)."""
    k = 48
    out = np.empty((N, k, ed.IMAGE_SIZE, ed.IMAGE_SIZE, 3), np.float32)
    for c in range(N):
        for j in range(k):
            image, label = ed.sample("val", c + j * N, seed=0)
            assert label == c
            out[c, j] = image
    return out / 255.0


def test_class_names_are_unique_readable_and_enough():
    assert len(ed.CLASS_NAMES) >= 10
    assert len(set(ed.CLASS_NAMES)) == len(ed.CLASS_NAMES)
    assert all(isinstance(n, str) and n.strip() == n and n for n in ed.CLASS_NAMES)
    assert ed.IMAGE_SIZE == 64


def test_sample_shape_dtype_and_label():
    for index in range(2 * N):
        image, label = ed.sample("train", index)
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        assert image.flags.c_contiguous
        assert label == index % N


def test_render_is_determined_by_the_rng():
    for c in range(N):
        a = ed.render(c, np.random.default_rng(123))
        b = ed.render(c, np.random.default_rng(123))
        assert a.tobytes() == b.tobytes()


def test_sample_is_deterministic_and_seed_dependent():
    a, _ = ed.sample("train", 37, seed=5)
    b, _ = ed.sample("train", 37, seed=5)
    c, _ = ed.sample("train", 37, seed=6)
    assert a.tobytes() == b.tobytes()
    assert a.tobytes() != c.tobytes()


def test_sample_does_not_depend_on_order_or_history():
    # Any worker must be able to render any index on its own.
    forward = [ed.sample("train", i)[0].tobytes() for i in range(5)]
    backward = [ed.sample("train", i)[0].tobytes() for i in reversed(range(5))][::-1]
    assert forward == backward


def test_train_and_val_differ():
    train = {ed.sample("train", i)[0].tobytes() for i in range(3 * N)}
    val = {ed.sample("val", i)[0].tobytes() for i in range(3 * N)}
    assert len(train) == len(val) == 3 * N  # no duplicates within a split either
    assert not train & val


def test_class_balance():
    labels = [ed.sample("train", i)[1] for i in range(5 * N)]
    assert np.bincount(labels, minlength=N).tolist() == [5] * N
    ds = ed.EmbeddedDataset("val", size=3 * N)
    assert sorted(ds[i][1] for i in range(len(ds))) == sorted(list(range(N)) * 3)


def test_every_class_varies(per_class_images):
    for c in range(N):
        imgs = per_class_images[c]
        # Two samples of a class differ, and not just by noise: the mean absolute difference is visible.
        assert np.abs(imgs[0] - imgs[1]).mean() > 0.03, ed.CLASS_NAMES[c]
        # Images use a reasonable range (not blank, not saturated).
        assert imgs.std() > 0.1, ed.CLASS_NAMES[c]


def test_class_means_are_far_apart(per_class_images):
    """A recognisability proxy: every pair of class-mean images is clearly different.

    With 48 samples the mean of one class differs from itself by ~0.04 RMS (sampling noise), so
    0.065 fails if two classes draw the same thing; the real minimum is ~0.085-0.1.
    """
    means = per_class_images.mean(axis=1)
    for a, b in itertools.combinations(range(N), 2):
        rms = float(np.sqrt(((means[a] - means[b]) ** 2).mean()))
        assert rms > 0.065, (ed.CLASS_NAMES[a], ed.CLASS_NAMES[b], rms)


def test_each_class_mean_is_closest_to_itself(per_class_images):
    """The mean of one half of a class is nearer its other half's mean than any other class's mean."""
    first = per_class_images[:, ::2].mean(axis=1).reshape(N, -1)
    second = per_class_images[:, 1::2].mean(axis=1).reshape(N, -1)
    dist = ((first[:, None] - second[None]) ** 2).sum(-1)
    assert dist.argmin(axis=1).tolist() == list(range(N))


def test_nearest_class_mean_classifier_beats_chance(per_class_images):
    """Held-out images are mostly closest to their own class mean (chance would be 1/N)."""
    small = per_class_images.reshape(N, -1, 16, 4, 16, 4, 3).mean(axis=(3, 5))  # 16x16 thumbnails
    fit, held = small[:, ::2], small[:, 1::2]
    centroids = fit.mean(axis=1).reshape(N, -1)
    queries = held.reshape(-1, centroids.shape[1])
    truth = np.repeat(np.arange(N), held.shape[1])
    predicted = ((queries[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
    accuracy = float((predicted == truth).mean())
    assert accuracy > 0.7, accuracy  # measured ~0.83-0.89
    recall = {ed.CLASS_NAMES[c]: float((predicted[truth == c] == c).mean()) for c in range(N)}
    assert min(recall.values()) > 0.25, recall  # measured >= 0.46 (sun, flower: most varied backgrounds)


def test_dataset_items():
    ds = ed.EmbeddedDataset("train", size=N, seed=1)
    assert len(ds) == N
    x, y = ds[3]
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0
    assert y == 3
    image, _ = ed.sample("train", 3, seed=1)
    assert torch.equal(x, torch.from_numpy(image).permute(2, 0, 1).float() / 127.5 - 1.0)
    assert torch.equal(ds[3][0], x)


def test_dataset_flip_is_deterministic_and_really_flips():
    plain = ed.EmbeddedDataset("train", size=40)
    flipped = ed.EmbeddedDataset("train", size=40, flip=True)
    flags = []
    for i in range(40):
        a, b = plain[i][0], flipped[i][0]
        assert torch.equal(b, flipped[i][0])
        assert torch.equal(b, a) or torch.equal(b, a.flip(-1))
        flags.append(not torch.equal(b, a))
    assert 5 < sum(flags) < 35  # roughly half
    flipped.set_epoch(1)
    assert [not torch.equal(flipped[i][0], plain[i][0]) for i in range(40)] != flags


def test_dataset_works_with_a_dataloader():
    loader = torch.utils.data.DataLoader(ed.EmbeddedDataset("val", size=10), batch_size=4)
    batches = list(loader)
    assert [b[0].shape[0] for b in batches] == [4, 4, 2]
    assert batches[0][1].tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("split", ["test", "Train", "", None])
def test_unknown_split_is_rejected(split):
    with pytest.raises(ValueError, match="split"):
        ed.sample(split, 0)
    with pytest.raises(ValueError, match="split"):
        ed.EmbeddedDataset(split)


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="index"):
        ed.sample("train", -1)
    with pytest.raises(ValueError, match="index"):
        ed.sample("train", 1.5)
    with pytest.raises(ValueError, match="seed"):
        ed.sample("train", 0, seed=-3)
    rng = np.random.default_rng(0)
    for bad in (-1, N, 1.0, True):
        with pytest.raises(ValueError, match="class_id"):
            ed.render(bad, rng)
    with pytest.raises(ValueError, match="size"):
        ed.EmbeddedDataset(size=-1)
    ds = ed.EmbeddedDataset(size=3)
    with pytest.raises(IndexError):
        ds[3]
    with pytest.raises(IndexError):
        ds[-1]


def test_preview_grid(tmp_path):
    grid = ed.preview_grid(per_class=3)
    assert grid.shape == (N * 66, 3 * 66, 3) and grid.dtype == np.uint8
    assert grid[:64, :64].tobytes() == ed.sample("val", 0)[0].tobytes()
    path = tmp_path / "grid.png"
    ed.save_preview_grid(str(path), per_class=2, scale=2)
    from PIL import Image

    with Image.open(path) as im:
        assert im.height == N * 66 * 2 and im.width > 2 * 66 * 2
    with pytest.raises(ValueError):
        ed.save_preview_grid(str(path), per_class=0)
