"""The landscape domain and the pretrained tiny base model of ``sd_memfree.testing.tiny``."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sd_memfree.testing.tiny import TinyBaseConfig, make_tiny_dataset, make_tiny_landscape, make_tiny_tartan, tiny_base_model


def test_landscape_is_deterministic_and_indices_differ():
    """Same (index, seed) -> identical pixels and caption; 8 indices -> 8 different images whose
    captions end with their own index ("picture i")."""
    a, cap_a = make_tiny_landscape(3, size=32, seed=0)
    b, cap_b = make_tiny_landscape(3, size=32, seed=0)
    assert np.array_equal(np.asarray(a), np.asarray(b)) and cap_a == cap_b
    arrays = [np.asarray(make_tiny_landscape(i, 32)[0]).tobytes() for i in range(8)]
    assert len(set(arrays)) == 8
    assert all(make_tiny_landscape(i, 32)[1].endswith(f"picture {i}") for i in range(8))
    assert a.size == (32, 32) and cap_a.startswith("a landscape with")


def test_tartan_is_a_woven_texture_described_by_its_caption():
    """The second domain: same (index, seed) -> identical; 64 indices -> 64 different images; the
    caption names three palette colours (ground, bands, lines) and each of them is the nearest
    palette colour of at least 2 of the 256 pixels (the pixel noise has std 4; palette colours are
    over 40 apart), so the caption describes what was drawn."""
    from sd_memfree.testing.tiny import _TARTAN_COLORS

    a, cap = make_tiny_tartan(5, size=16)
    assert np.array_equal(np.asarray(a), np.asarray(make_tiny_tartan(5, size=16)[0])) and cap == make_tiny_tartan(5, 16)[1]
    assert len({np.asarray(make_tiny_tartan(i, 16)[0]).tobytes() for i in range(64)}) == 64
    names = list(_TARTAN_COLORS)
    palette = np.array([_TARTAN_COLORS[n] for n in names], float)
    for i in range(16):
        img, cap = make_tiny_tartan(i, 16)
        assert cap.endswith(f"picture {i}") and "tartan with a" in cap
        named = [n for n in names if f" {n} " in f" {cap} "]
        assert len(named) == 3, cap
        px = np.asarray(img).reshape(-1, 1, 3).astype(float)
        nearest = np.array(names)[np.abs(px - palette[None]).sum(-1).argmin(1)]
        assert all((nearest == n).sum() >= 2 for n in named), (cap, {n: int((nearest == n).sum()) for n in names})


def test_landscape_dataset_duplicates_and_heldout_range(tmp_path):
    """6 distinct, fraction 1/3 -> int(6/3) = 2 duplicated x4: 2*4 + 4 = 12 rows; a held-out set
    from first_index=100 shares no caption with it."""
    train = make_tiny_dataset(tmp_path / "t", num_images=6, size=32, duplicate_fraction=1 / 3, duplicate_times=4, kind="landscapes")
    rows = [json.loads(line) for line in (train / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 12
    assert sum(r["text"].endswith("picture 0") for r in rows) == 4
    held = make_tiny_dataset(tmp_path / "h", num_images=3, size=32, kind="landscapes", first_index=100)
    held_caps = {json.loads(line)["text"] for line in (held / "metadata.jsonl").read_text().splitlines()}
    assert held_caps.isdisjoint({r["text"] for r in rows}) and len(held_caps) == 3
    assert all(c.endswith(("picture 100", "picture 101", "picture 102")) for c in held_caps)
    with pytest.raises(ValueError, match="kind"):
        make_tiny_dataset(tmp_path / "x", num_images=2, kind="faces")


def test_tiny_base_builds_once_and_loads(tmp_path, monkeypatch):
    """A 2-step build: the folder loads with from_pretrained, base_info.json records the VAE's
    reconstruction error, the scaling factor is 1/std of the latents (set, so not SD's 0.18215),
    and a second call returns the cached folder without rebuilding (same mtime). Pretraining
    drops captions: with caption_dropout 0.5 some UNet inputs are the empty prompt's embedding
    (what the pipeline uses as the unconditional input), the others are not."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    seen = []
    forward = UNet2DConditionModel.forward

    def recording(self, sample, timestep, encoder_hidden_states, *args, **kwargs):
        seen.append(encoder_hidden_states.detach().clone())
        return forward(self, sample, timestep, encoder_hidden_states, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", recording)
    cfg = TinyBaseConfig(vae_steps=2, unet_steps=2, vae_images=8, unet_images=8, caption_dropout=0.5)
    path = tiny_base_model(tmp_path, cfg, progress=False)
    monkeypatch.setattr(UNet2DConditionModel, "forward", forward)
    info = json.loads((path / "base_info.json").read_text())
    assert 0 < info["vae_recon_mse"] < 1 and info["vae_recon_psnr_db"] == pytest.approx(-10 * np.log10(info["vae_recon_mse"]))
    pipe = StableDiffusionPipeline.from_pretrained(str(path), safety_checker=None, requires_safety_checker=False)
    assert pipe.vae.config.scaling_factor == pytest.approx(info["vae_scaling_factor"]) and info["vae_scaling_factor"] != pytest.approx(0.18215)
    with torch.no_grad():
        empty = pipe.encode_prompt("", "cpu", 1, False)[0][0]
    dropped = [bool(torch.equal(row, empty)) for batch in seen for row in batch]
    assert len(dropped) == 2 * cfg.batch_size and 0 < sum(dropped) < len(dropped)
    assert pipe.unet.config.block_out_channels == list(cfg.unet_channels) or tuple(pipe.unet.config.block_out_channels) == cfg.unet_channels
    mtime = (path / "base_info.json").stat().st_mtime
    assert tiny_base_model(tmp_path, cfg, progress=False) == path
    assert (path / "base_info.json").stat().st_mtime == mtime


def test_base_cache_key_changes_with_the_recipe():
    """The cache key covers every build setting (caption dropout included) and the recipe version,
    so a base built by older code or other settings is never reused."""
    assert TinyBaseConfig().key().startswith("tiny-base-v2-")
    assert TinyBaseConfig(caption_dropout=0.0).key() != TinyBaseConfig().key()
