"""The VTAB-style pictures, tasks and ViT base: deterministic, balanced, labelled truly, split cleanly."""
from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy import ndimage

from adapterlab.worlds import vtab
from adapterlab.encoders.transformer import ViT

SMALL = dict(n_train=24, n_val=12, n_test=12)  # enough to see balance; seconds for all tasks


@pytest.fixture(scope="module")
def small_tasks():
    return {name: vtab.make_task(name, seed=0, **SMALL) for name in vtab.TASKS}


def splits(task):
    return [(task.train_images, task.train_labels), (task.val_images, task.val_labels), (task.test_images, task.test_labels)]


# ---------------------------------------------------------------------------- the task list
def test_seven_tasks_in_the_three_groups_each_group_at_least_two():
    assert vtab.GROUPS == ("natural", "specialized", "structured")
    assert set(vtab.TASKS.values()) == set(vtab.GROUPS)
    assert all(sum(g == group for g in vtab.TASKS.values()) >= 2 for group in vtab.GROUPS)
    assert vtab.TASKS["digits"] == "natural"


def test_unknown_task_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown VTAB task 'cifar'.*digits.*orientation"):
        vtab.make_task("cifar")


# ---------------------------------------------------------------------------- every task
def test_pictures_are_uint8_32x32_rgb_and_labels_int64_in_range(small_tasks):
    for name, task in small_tasks.items():
        assert task.group == vtab.TASKS[name]
        for (images, labels), n in zip(splits(task), SMALL.values()):
            assert images.dtype == torch.uint8 and tuple(images.shape) == (n, 3, 32, 32), name
            assert labels.dtype == torch.int64 and tuple(labels.shape) == (n,), name
            assert 0 <= labels.min() and labels.max() < task.n_classes, name
            assert images.float().std() > 10, f"{name}: the pictures are (nearly) blank"


def test_classes_are_balanced_in_every_split(small_tasks):
    for name, task in small_tasks.items():
        for images, labels in splits(task):
            counts = torch.bincount(labels, minlength=task.n_classes)
            assert counts.max() - counts.min() <= 1, f"{name}: class counts {counts.tolist()}"


def test_every_task_is_deterministic_for_a_seed_and_changes_with_it(small_tasks):
    for name, first in small_tasks.items():
        again = vtab.make_task(name, seed=0, **SMALL)
        other = vtab.make_task(name, seed=1, **SMALL)
        for (a, la), (b, lb), (c, _) in zip(splits(first), splits(again), splits(other)):
            assert torch.equal(a, b) and torch.equal(la, lb), f"{name}: seed 0 gave two different sets"
            assert not torch.equal(a, c), f"{name}: seeds 0 and 1 gave the same pictures"


def test_a_split_does_not_depend_on_the_sizes_of_the_others():
    a = vtab.make_task("count", seed=3, n_train=6, n_val=4, n_test=4)
    b = vtab.make_task("count", seed=3, n_train=10, n_val=0, n_test=4)
    assert torch.equal(a.test_images, b.test_images) and torch.equal(a.test_labels, b.test_labels)
    assert not torch.equal(a.train_images[:4], a.val_images)  # independent streams


def test_train_and_val_is_the_1000_of_vtab_1k():
    assert vtab.SPLIT_SIZES["train"] + vtab.SPLIT_SIZES["val"] == 1000
    task = vtab.make_task("orientation", seed=0, **SMALL)
    images, labels = task.train_and_val()
    assert torch.equal(images, torch.cat([task.train_images, task.val_images]))
    assert torch.equal(labels, torch.cat([task.train_labels, task.val_labels]))


# ---------------------------------------------------------------------------- the labels say what the pictures show
def foreground(image: torch.Tensor) -> np.ndarray:
    """Pixels far from the (flat, light) background colour -> bool (32, 32)."""
    x = image.permute(1, 2, 0).numpy().astype(float)
    return np.abs(x - np.median(x.reshape(-1, 3), axis=0)).max(axis=-1) > 60


def test_count_pictures_show_label_plus_one_separate_objects():
    task = vtab.make_task("count", seed=0, n_train=60, n_val=0, n_test=0)
    for image, label in zip(task.train_images, task.train_labels):
        _, n_objects = ndimage.label(foreground(image))
        assert n_objects == label + 1


def test_orientation_bar_points_into_its_bin():
    task = vtab.make_task("orientation", seed=0, n_train=60, n_val=0, n_test=0)
    width = 180 / vtab.ORIENTATION_BINS
    for image, label in zip(task.train_images, task.train_labels):
        ys, xs = np.nonzero(foreground(image))
        cov = np.cov(np.stack([xs, -ys]))  # y up, so angles run counter-clockwise as the class names say
        _, vectors = np.linalg.eigh(cov)
        angle = np.degrees(np.arctan2(vectors[1, -1], vectors[0, -1])) % 180  # the long axis
        off = (angle - (label.item() + 0.5) * width + 90) % 180 - 90  # from the bin's middle, wrapped
        assert abs(off) <= width / 2 + 4, f"bar at {angle:.0f} deg labelled {task.classes[label]}"


def test_distance_pictures_have_two_objects_the_labelled_distance_apart():
    task = vtab.make_task("distance", seed=0, n_train=40, n_val=0, n_test=0)
    for image, label in zip(task.train_images, task.train_labels):
        parts, n = ndimage.label(foreground(image))
        assert n == 2
        (y0, x0), (y1, x1) = ndimage.center_of_mass(np.ones_like(parts), parts, [1, 2])
        lo, hi = vtab.DISTANCE_BINS[label], vtab.DISTANCE_BINS[label + 1]
        assert lo - 1.5 <= np.hypot(x1 - x0, y1 - y0) <= hi + 1.5  # + 0.5 px: pixel centres vs true centres


# ---------------------------------------------------------------------------- the real digits
def test_digits_splits_are_disjoint_balanced_and_the_real_scans():
    from sklearn.datasets import load_digits

    digits = load_digits()
    sizes = vtab.SPLIT_SIZES
    idx = vtab.digits_split_indices(0, sizes, digits.target)
    assert {s: len(i) for s, i in idx.items()} == sizes
    everything = np.concatenate(list(idx.values()))
    assert len(np.unique(everything)) == len(everything) == 1500  # no picture in two splits
    for split, i in idx.items():
        assert (np.bincount(digits.target[i], minlength=10) == sizes[split] // 10).all()
    task = vtab.make_task("digits", seed=0, n_train=20, n_val=10, n_test=10)
    small = vtab.digits_split_indices(0, {"train": 20, "val": 10, "test": 10}, digits.target)
    assert torch.equal(task.test_images, torch.from_numpy(vtab.digits_to_images(digits.images[small["test"]])))
    assert torch.equal(task.test_labels, torch.from_numpy(digits.target[small["test"]]).long())
    assert task.train_images[:, 0].float().mean() > 128  # dark ink on light paper, like the other tasks


def test_digits_asking_for_more_than_there_are_says_so():
    with pytest.raises(ValueError, match="1797 pictures.*n_train"):
        vtab.make_task("digits", n_train=1500, n_val=200, n_test=200)


def test_digits_to_images_is_ink_dark_and_upsampled():
    blank, full = np.zeros((1, 8, 8)), np.full((1, 8, 8), 16.0)
    assert (vtab.digits_to_images(blank) == 245).all() and (vtab.digits_to_images(full) == 20).all()
    assert vtab.digits_to_images(blank).shape == (1, 3, 32, 32)


# ---------------------------------------------------------------------------- the pretraining pictures
def test_pretraining_set_is_deterministic_balanced_and_apart_from_its_heldout_set():
    images, labels = vtab.pretrain_set(48, seed=0)
    again, labels_again = vtab.pretrain_set(48, seed=0)
    assert torch.equal(images, again) and torch.equal(labels, labels_again)
    assert not torch.equal(images, vtab.pretrain_set(48, seed=1)[0])
    assert not torch.equal(images[:16], vtab.pretrain_set(16, seed=0, split="heldout")[0])
    assert images.dtype == torch.uint8 and tuple(images.shape) == (48, 3, 32, 32)
    assert len(vtab.PRETRAIN_CLASSES) == 16 and vtab.PRETRAIN_CLASSES[0] == "red circle"
    assert torch.bincount(labels, minlength=16).tolist() == [3] * 16


def test_new_shapes_are_not_among_the_pretraining_shapes():
    assert set(vtab.NEW_SHAPES).isdisjoint(vtab.PRETRAIN_SHAPES)
    assert not any(shape in name for name in vtab.PRETRAIN_CLASSES for shape in vtab.NEW_SHAPES)


def test_images_to_float():
    x = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1)
    assert torch.allclose(vtab.images_to_float(x).flatten(), torch.tensor([0.0, 0.2, 1.0]))
    with pytest.raises(TypeError, match="uint8"):
        vtab.images_to_float(x.float())


# ---------------------------------------------------------------------------- accuracy
class FirstPixel(torch.nn.Module):
    """Predicts the class written in the first pixel: logits = one-hot(round(255 * x[:, 0, 0, 0]))."""

    def __init__(self, n_classes: int = 5):
        super().__init__()
        self.n_classes = n_classes
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.seen_training = []

    def forward(self, x):
        self.seen_training.append(self.training)
        return torch.nn.functional.one_hot((x[:, 0, 0, 0] * 255).round().long(), self.n_classes).float()


def test_accuracy_counts_correct_argmaxes_over_batches_in_eval_mode():
    labels = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    images = torch.zeros(8, 3, 2, 2, dtype=torch.uint8)
    images[:, 0, 0, 0] = labels.to(torch.uint8)
    images[[1, 6], 0, 0, 0] = 4  # two wrong predictions out of eight
    model = FirstPixel().train()
    assert vtab.accuracy(model, images, labels, batch_size=3) == 0.75
    assert model.seen_training == [False] * 3 and model.training  # eval inside, the old mode restored
    with pytest.raises(ValueError, match="8 pictures but 7 labels"):
        vtab.accuracy(model, images, labels[:7])


# ---------------------------------------------------------------------------- the base: name, cache, same bytes
TINY = replace(vtab.VIT_RECIPE, model=dict(vtab.VIT_RECIPE.model, dim=16, n_layers=1, n_heads=2, mlp_hidden=32),
               n_images=64, n_heldout=16, steps=3, batch_size=16, warmup_steps=1)


def test_base_name_is_a_hash_of_the_recipe():
    name = vtab.vit_base_name()
    assert name.startswith("vit-") and len(name) == 16 and int(name[4:], 16) >= 0
    assert vtab.vit_base_name(TINY) != name and vtab.vit_base_name(replace(TINY)) == vtab.vit_base_name(TINY)


def test_base_is_built_once_into_the_cache_and_rebuilds_to_the_same_bytes(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTERLAB_CACHE", str(tmp_path))
    folder = vtab.build_vit_base(progress=False, recipe=TINY)
    assert folder == tmp_path / vtab.vit_base_name(TINY)
    weights = (folder / "model.safetensors").read_bytes()
    info = vtab.base_info(TINY)
    assert len(info["loss_history"]) == TINY.steps and 0 <= info["heldout_accuracy"] <= 1
    assert info["threads"] == 1 and info["recipe"]["n_images"] == 64
    stamp = (folder / "vit.json").stat().st_mtime_ns
    assert vtab.build_vit_base(progress=False, recipe=TINY) == folder
    assert (folder / "vit.json").stat().st_mtime_ns == stamp  # cached: not built again
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # the build fixes its own thread count
    try:
        vtab.build_vit_base(progress=False, force=True, recipe=TINY)
    finally:
        torch.set_num_threads(before)
    assert (folder / "model.safetensors").read_bytes() == weights
    model = vtab.load_vit_base(recipe=TINY)
    assert isinstance(model, ViT) and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert model.head.out_features == len(vtab.PRETRAIN_CLASSES)
