"""Loss-aware augmentation: strength formula, the shared strength store, the transform, and
DataLoader workers seeing strengths written by the main process."""

import math
import pickle

import pytest
import torch
from PIL import Image, ImageChops

from sd_memfree.method.augment import AugmentationStrengths, LossAwareAugment, augmentation_strength
from sd_memfree.testing.tiny import make_tiny_image


def test_strength_is_one_at_threshold_and_decays():
    """ratio 1.25, alpha 5. t=0: bank 2.5, l=2 -> 1.25*2 = 2.5 -> d = 0 -> s = 1.
    t=1: bank 2, l=3.2 -> 4 = 2*bank -> d = |4-2|/2 = 1 -> s = exp(-5) = 0.006738.
    t=1: l=0.8 -> 1 -> d = |1-2|/2 = 0.5 -> s = exp(-2.5) = 0.082085 (below the threshold too)."""
    bank = torch.tensor([2.5, 2.0, 0.0])
    s = augmentation_strength(torch.tensor([2.0, 3.2, 0.8]), torch.tensor([0, 1, 1]), bank, ratio=1.25, alpha=5.0)
    torch.testing.assert_close(s, torch.tensor([1.0, 0.006738, 0.082085]), atol=1e-6, rtol=0)
    assert math.exp(-5) == pytest.approx(0.006738, abs=1e-6)


def test_strength_zero_where_threshold_undefined_or_loss_non_finite():
    """bank[2] = 0: threshold undefined -> 0 (not NaN from 0/0). NaN/inf losses -> 0."""
    bank = torch.tensor([2.5, 2.0, 0.0])
    s = augmentation_strength(
        torch.tensor([1.0, float("nan"), float("inf")]), torch.tensor([2, 0, 1]), bank, ratio=1.25, alpha=5.0
    )
    assert s.tolist() == [0.0, 0.0, 0.0]


def test_strengths_store_kept_samples_only():
    """ids (0, 2, 3), strengths (0.5, 0.9, 0.1), keep (T, F, T): values[0] = 0.5, values[3] = 0.1,
    values[2] stays at its previous 0.7 because the sample was skipped."""
    store = AugmentationStrengths(5)
    store.values[2] = 0.7
    store.update(torch.tensor([0, 2, 3]), torch.tensor([0.5, 0.9, 0.1]), torch.tensor([True, False, True]))
    torch.testing.assert_close(store.values, torch.tensor([0.5, 0.0, 0.7, 0.1, 0.0]))
    assert store.mean() == pytest.approx((0.5 + 0.7 + 0.1) / 5)
    assert len(store) == 5
    assert store.values.is_shared()


def test_strengths_state_dict_round_trip_in_place():
    store = AugmentationStrengths(3)
    store.update(torch.tensor([1]), torch.tensor([0.25]), torch.tensor([True]))
    other = AugmentationStrengths(3)
    shared = other.values
    other.load_state_dict(store.state_dict())
    assert other.values is shared  # loader workers keep reading the same memory
    assert other.values.tolist() == [0.0, 0.25, 0.0]
    with pytest.raises(ValueError, match="for 3 samples but the training set has 4"):
        AugmentationStrengths(4).load_state_dict(store.state_dict())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_strengths_from_device_are_applied_at_next_update_or_flush():
    store = AugmentationStrengths(4)
    cuda = torch.device("cuda")
    # Built before the sync check: torch.tensor(..., device=cuda) is itself a blocking copy.
    ids, strengths, keep = torch.tensor([1, 2]), torch.tensor([0.5, 0.9], device=cuda), torch.tensor([True, False], device=cuda)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        store.update(ids, strengths, keep)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    store.flush()
    torch.testing.assert_close(store.values, torch.tensor([0.0, 0.5, 0.0, 0.0]))
    store.update(torch.tensor([3], device=cuda), torch.tensor([0.25], device=cuda), torch.tensor([True], device=cuda))
    assert store.state_dict()["values"].tolist() == [0.0, 0.5, 0.0, 0.25]


def test_magnitude_rounds_strength_times_max():
    """m_max 5: s 0.09 -> 0.45 -> 0; s 0.45 -> 2.25 -> 2; s 0.95 -> 4.75 -> 5; s 1 -> 5."""
    store = AugmentationStrengths(4)
    store.values.copy_(torch.tensor([0.09, 0.45, 0.95, 1.0]))
    augment = LossAwareAugment(store, max_magnitude=5)
    assert [augment.magnitude(i) for i in range(4)] == [0, 2, 5, 5]


def test_transform_identity_at_zero_and_changes_at_one():
    image, _ = make_tiny_image(0, size=32)
    store = AugmentationStrengths(2)
    store.values[1] = 1.0
    augment = LossAwareAugment(store, max_magnitude=5)
    assert augment(image, 0) is image
    torch.manual_seed(0)
    out = augment(image, 1)
    assert isinstance(out, Image.Image) and out.size == image.size
    assert ImageChops.difference(out, image).getbbox() is not None  # some pixel changed


def test_transform_is_picklable_and_shares_values():
    store = AugmentationStrengths(2)
    augment = pickle.loads(pickle.dumps(LossAwareAugment(store, max_magnitude=3)))
    assert augment.max_magnitude == 3 and augment.values.shape == (2,)


class _StrengthDataset(torch.utils.data.Dataset):
    """Returns what a loader worker reads from the shared strengths."""

    def __init__(self, store: AugmentationStrengths) -> None:
        self.augment = LossAwareAugment(store)

    def __len__(self) -> int:
        return len(self.augment.values)

    def __getitem__(self, i: int) -> float:
        return float(self.augment.values[i])


def test_loader_workers_see_strengths_written_after_they_started():
    """Persistent forked workers started in epoch 1 must read the values written before epoch 2
    (a private copy of the tensor would still read 0 there); a new loader iterator over the
    same DataLoader object, as the script makes each epoch, reads them too."""
    store = AugmentationStrengths(4)
    loader = torch.utils.data.DataLoader(
        _StrengthDataset(store), batch_size=2, num_workers=2, persistent_workers=True, multiprocessing_context="fork"
    )
    assert torch.cat(list(loader)).tolist() == [0.0, 0.0, 0.0, 0.0]
    store.update(torch.tensor([1, 3]), torch.tensor([0.5, 0.25]), torch.tensor([True, True]))
    assert torch.cat(list(loader)).tolist() == [0.0, 0.5, 0.0, 0.25]
    fresh = torch.utils.data.DataLoader(_StrengthDataset(store), batch_size=2, num_workers=2)
    store.update(torch.tensor([0]), torch.tensor([1.0]), torch.tensor([True]))
    assert torch.cat(list(fresh)).tolist() == [1.0, 0.5, 0.0, 0.25]


@pytest.mark.slow
def test_spawned_loader_worker_shares_strengths():
    """Spawned workers get the dataset by pickling; the shared tensor must travel as a handle
    to the same memory, not as a copy (a copy would still read 0 in epoch 2). ~10-50 s: a
    spawned worker imports torch, torchvision and this module afresh."""
    store = AugmentationStrengths(2)
    loader = torch.utils.data.DataLoader(
        _StrengthDataset(store), batch_size=2, num_workers=1, persistent_workers=True, multiprocessing_context="spawn"
    )
    assert torch.cat(list(loader)).tolist() == [0.0, 0.0]
    store.update(torch.tensor([1]), torch.tensor([0.5]), torch.tensor([True]))
    assert torch.cat(list(loader)).tolist() == [0.0, 0.5]


class _Rows(list):
    """What IndexedCaptionDataset reads from a datasets.Dataset: a caption column, and a batch of
    rows by a list of indices (as a dict of columns, like ``datasets.Dataset.__getitem__``)."""

    def __getitem__(self, key):
        if key == "text":
            return [row["text"] for row in self]
        if isinstance(key, list):
            return {column: [list.__getitem__(self, i)[column] for i in key] for column in ("image", "text")}
        return list.__getitem__(self, key)


class _Tokenizer:
    model_max_length = 4

    def __call__(self, caption, **kwargs):
        return type("Encoding", (), {"input_ids": torch.zeros(1, 4, dtype=torch.long)})


def test_dataset_augments_the_image_as_loaded_then_resizes_crops_flips():
    """The reference's order: RandAugment on the 64 px image as loaded, then resize/crop to 32 px.
    The item equals resize/crop(RandAugment(image)) drawn under the item's seed."""
    from sd_memfree.data import IndexedCaptionDataset, build_image_transforms

    image, _ = make_tiny_image(0, size=64)
    store = AugmentationStrengths(1)
    store.values[0] = 1.0
    augment = LossAwareAugment(store, max_magnitude=5)
    seen = []

    def recording_augment(img, sample_id):
        seen.append(img.size)
        return augment(img, sample_id)

    geometric, to_tensor = build_image_transforms(32, center_crop=False, random_flip=True)
    ds = IndexedCaptionDataset(_Rows([{"image": image, "text": "a"}]), "image", "text", _Tokenizer(), geometric, to_tensor,
                               augment=recording_augment)
    item = ds[(0, 123)]
    assert seen == [(64, 64)] and item["pixel_values"].shape == (3, 32, 32)
    torch.manual_seed(123)
    expected = to_tensor(geometric(augment(image.convert("RGB"), 0)))
    assert torch.equal(item["pixel_values"], expected)
