"""IndexedCaptionDataset: a batched read gives the same items as one-by-one reads, and the
random crop/flip of an item depends on its seed alone."""

from __future__ import annotations

import torch

from sd_memfree.data import IndexedCaptionDataset, build_image_transforms, load_image_caption_dataset


def _dataset(tiny_model_dir, tiny_data_dir):
    from transformers import CLIPTokenizer

    ds, image_column, caption_column = load_image_caption_dataset(train_data_dir=str(tiny_data_dir))
    tokenizer = CLIPTokenizer.from_pretrained(tiny_model_dir, subfolder="tokenizer")
    geometric, to_tensor = build_image_transforms(16, center_crop=False, random_flip=True)
    return IndexedCaptionDataset(ds, image_column, caption_column, tokenizer, geometric, to_tensor), geometric, to_tensor, tokenizer


def test_batched_items_equal_single_items_and_seeded_crops(tiny_model_dir, tiny_data_dir, monkeypatch):
    """keys (sample 3, seed 11), (sample 0, seed 5), (sample 3, seed 14): the batch equals the
    three single reads; each crop/flip equals the transforms run after torch.manual_seed(seed)
    (what seeding the CPU generator alone must reproduce); the global RNG is left as it was;
    and torch.manual_seed (which also queues CUDA/XPU/MTIA seeding) is never called."""
    dataset, geometric, to_tensor, tokenizer = _dataset(tiny_model_dir, tiny_data_dir)
    keys = [(3, 11), (0, 5), (3, 14)]
    want = []
    for sample_id, seed in keys:
        torch.manual_seed(seed)
        pixels = to_tensor(geometric(dataset.ds[sample_id]["image"].convert("RGB")))
        ids = tokenizer(dataset.ds[sample_id]["text"], max_length=tokenizer.model_max_length, padding="max_length",
                        truncation=True, return_tensors="pt").input_ids[0]
        want.append((pixels, ids))
    assert not torch.equal(want[0][0], want[2][0]), "seed 11 flips, seed 14 does not (the first draw after the seed)"

    def forbidden(seed):
        raise AssertionError("torch.manual_seed called per item")

    torch.manual_seed(0)
    before = torch.get_rng_state()
    monkeypatch.setattr(torch, "manual_seed", forbidden)
    batch = dataset.__getitems__(keys)
    singles = [dataset[k] for k in keys]
    monkeypatch.undo()
    assert torch.equal(torch.get_rng_state(), before)
    for got, one, (pixels, ids), (sample_id, _) in zip(batch, singles, want, keys):
        assert got["sample_id"] == one["sample_id"] == sample_id
        assert torch.equal(got["pixel_values"], pixels) and torch.equal(one["pixel_values"], pixels)
        assert torch.equal(got["input_ids"], ids) and torch.equal(one["input_ids"], ids)


def test_a_list_of_captions_is_chosen_by_the_item_seed():
    """Caption lists: random.Random(seed).choice, whichever process or worker reads the item."""
    import random

    ds = IndexedCaptionDataset.__new__(IndexedCaptionDataset)
    ds.captions = [["a", "b", "c", "d"]]
    assert [ds.caption_for(0, s) for s in (1, 2, 3)] == [random.Random(s).choice(["a", "b", "c", "d"]) for s in (1, 2, 3)]
