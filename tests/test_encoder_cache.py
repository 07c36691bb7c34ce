"""--cache_latents / --cache_text_embeddings (sd_memfree/encoder_cache.py, cache_store.py), offline on
the tiny models: cached runs equal live runs bit for bit (SD full and LoRA, SDXL, method on with
augmented rows encoded live), flips, invalidation, corrupt files, two concurrent builders, resume."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sd_memfree import encoder_cache as ec
from sd_memfree.cache_store import CacheStore

REPO = Path(__file__).resolve().parents[1]
METHOD = ["--num_shards=2", "--merge_every=2", "--agc_ratio=1.02", "--agc_ema=0.1", "--redistribute_fraction=0.5",
          "--loss_aware_augmentation", "--augment_max_magnitude=30"]


def sd_args(model, data, out, *extra, steps=4):
    return [f"--pretrained_model_name_or_path={model}", f"--train_data_dir={data}", f"--output_dir={out}",
            "--resolution=32", "--train_batch_size=2", f"--max_train_steps={steps}", "--learning_rate=1e-3",
            "--lr_warmup_steps=0", "--seed=7", "--report_to=none", "--checkpointing_steps=1000000", "--center_crop",
            "--random_flip", *extra]


def final(out: Path, lora: bool) -> dict:
    return load_file(out / ("pytorch_lora_weights.safetensors" if lora else "unet/diffusion_pytorch_model.safetensors"))


def assert_same(a: dict, b: dict, atol: float = 0.0) -> None:
    """Equal bit for bit (``atol=0``), or to ``atol`` (float round-off)."""
    assert a.keys() == b.keys()
    different = [k for k in a if not (torch.equal(a[k], b[k]) if atol == 0 else torch.allclose(a[k], b[k], rtol=0, atol=atol))]
    assert different == [], f"{len(different)} tensors differ, e.g. {different[0]}: max {(a[different[0]] - b[different[0]]).abs().max():.3g}"


def few_timesteps(model: Path) -> Path:
    """The model with a 20-timestep scheduler, so AGC's loss banks fill (and rows get augmented) in a few steps."""
    path = model / "scheduler" / "scheduler_config.json"
    cfg = json.loads(path.read_text())
    cfg["num_train_timesteps"] = 20
    path.write_text(json.dumps(cfg))
    return model


@pytest.fixture
def rows(monkeypatch):
    """Counts of the rows the loop got cached and live (every collated micro-batch)."""
    counts = {"cached": 0, "live": 0}
    original = ec.collate

    def counting(examples):
        batch = original(examples)
        counts["live"] += int(batch["live"].sum())
        counts["cached"] += int((~batch["live"]).sum())
        return batch

    monkeypatch.setattr(ec, "collate", counting)
    return counts


@pytest.fixture
def posteriors(monkeypatch):
    """Every micro-batch's sample ids and posterior (mean, std) as the loop received them, per run."""
    runs: list[list] = []
    original = ec.FrozenEncoders.latent_dist

    def recording(self, batch):
        posterior = original(self, batch)
        runs[-1].append((batch["sample_ids"].tolist(), posterior.mean.clone(), posterior.std.clone()))
        return posterior

    monkeypatch.setattr(ec.FrozenEncoders, "latent_dist", recording)
    return runs


def assert_same_posteriors(live: list, cached: list, atol: float) -> None:
    assert len(live) == len(cached) > 0
    for (ids_a, mean_a, std_a), (ids_b, mean_b, std_b) in zip(live, cached):
        assert ids_a == ids_b
        torch.testing.assert_close(mean_a, mean_b, rtol=0, atol=atol)
        torch.testing.assert_close(std_a, std_b, rtol=0, atol=atol)


@pytest.mark.parametrize("mode", ["full", "lora", "method", "latents_only", "text_only"])
def test_cached_sd_run_equals_live_run(tiny_model_dir, tiny_data_dir, tmp_path, rows, posteriors, mode):
    """Same flags and seed, with and without both caches: the loop gets the same posteriors and the
    final weights are equal bit for bit. With the method on (IET-AGC+ at full augmentation
    magnitude) some rows are augmented, so the cached run encodes them live: both kinds occur. A
    mixed micro-batch encodes its live rows in a smaller VAE call than the live run's, and CPU
    kernels round differently by batch size, so there the posteriors agree to round-off (1e-5)
    and Adam, which divides each gradient by its own running size, carries that into weights that
    agree to 1e-3 after 12 steps at lr 1e-3 (measured: 8e-5)."""
    from train_scripts import train_sd_ietagc as train

    extra = {"lora": ["--use_lora"], "method": METHOD}.get(mode, [])
    steps = 12 if mode == "method" else 4
    if mode == "method":
        tiny_model_dir = few_timesteps(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    posteriors.append([])
    train.main(train.parse_args(sd_args(tiny_model_dir, tiny_data_dir, tmp_path / "live", *extra, steps=steps)))
    flags = {"latents_only": ["--cache_latents"], "text_only": ["--cache_text_embeddings"]}.get(mode, ["--cache_latents", "--cache_text_embeddings"])
    cache = [*flags, f"--latent_cache_dir={tmp_path / 'cache'}"]
    posteriors.append([])
    train.main(train.parse_args(sd_args(tiny_model_dir, tiny_data_dir, tmp_path / "cached", *extra, *cache, steps=steps)))
    exact = mode != "method"
    assert_same_posteriors(*posteriors, atol=0 if exact else 1e-5)
    assert_same(final(tmp_path / "live", mode == "lora"), final(tmp_path / "cached", mode == "lora"), atol=0 if exact else 1e-3)
    assert rows["cached"] > 0 or mode == "text_only"
    if mode == "method":
        assert rows["live"] > 0, "no augmented row was encoded live: the test no longer covers the mixed batch"
    elif mode == "text_only":
        assert rows["cached"] == 0 and rows["live"] > 0
    else:
        assert rows["live"] == 0


def test_cached_sdxl_run_equals_live_run(tiny_data_dir, tmp_path, rows, posteriors):
    """SDXL with the method on and emptied prompts: both encoders and the pooled output come from
    the text cache, size and crop conditioning from the latent cache; weights equal to round-off
    (augmented rows are encoded live, in smaller VAE calls)."""
    from sd_memfree.testing.tiny import make_tiny_sdxl_model
    from train_scripts import train_sdxl_ietagc as train

    model = few_timesteps(make_tiny_sdxl_model(tmp_path / "sdxl", seed=0))
    base = [f"--pretrained_model_name_or_path={model}", f"--train_data_dir={tiny_data_dir}", "--resolution=32",
            "--train_batch_size=2", "--max_train_steps=12", "--learning_rate=1e-3", "--lr_warmup_steps=0", "--seed=3",
            "--report_to=none", "--checkpointing_steps=1000000", "--random_flip", "--center_crop",
            "--proportion_empty_prompts=0.3", *METHOD]
    posteriors.append([])
    train.main(train.parse_args([*base, f"--output_dir={tmp_path / 'live'}"]))
    posteriors.append([])
    train.main(train.parse_args([*base, f"--output_dir={tmp_path / 'cached'}", "--cache_latents", "--cache_text_embeddings",
                                 f"--latent_cache_dir={tmp_path / 'cache'}"]))
    assert_same_posteriors(*posteriors, atol=1e-5)  # mixed batches: round-off (see the SD test)
    assert_same(final(tmp_path / "live", False), final(tmp_path / "cached", False), atol=1e-3)
    assert rows["cached"] > 0 and rows["live"] > 0
    text_entries = list((tmp_path / "cache" / "text").rglob("*.safetensors"))
    captions = {json.loads(line)["text"] for line in (tiny_data_dir / "metadata.jsonl").read_text().splitlines() if line.strip()}
    assert len(text_entries) == len(captions) + 1  # every distinct caption and the empty one
    assert {"out.0", "out.1"} == set(load_file(text_entries[0]))  # hidden states of both encoders, pooled


def test_random_crops_are_refused_in_one_line(capsys):
    from train_scripts import train_sd_ietagc as train

    with pytest.raises(SystemExit):
        train.parse_args(["--pretrained_model_name_or_path=x", "--train_data_dir=y", "--cache_latents"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--cache_latents needs --center_crop" in err and "add --center_crop or drop --cache_latents" in err


# ---- the latent cache alone -------------------------------------------------------------------


def parts(model, data, resolution=32, flip=True):
    from diffusers import AutoencoderKL
    from transformers import CLIPTokenizer

    from sd_memfree.data import IndexedCaptionDataset, build_image_transforms, load_image_caption_dataset

    ds, ic, cc = load_image_caption_dataset(train_data_dir=str(data))
    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
    geometric, to_tensor = build_image_transforms(resolution, True, flip)
    return ds, ic, vae, IndexedCaptionDataset(ds, ic, cc, tokenizer, geometric, to_tensor)


def build(ds, ic, vae, dataset, root, resolution=32, flip=True, **kw):
    return ec.LatentCache.build(dataset, ds, ic, vae, {"pipeline": "sd", "resolution": resolution, "center_crop": True,
                                                        "random_flip": flip}, root, progress=False, **kw)


def test_flip_picks_the_orientation_the_dataset_draws(tiny_model_dir, tiny_data_dir, tmp_path):
    """For 40 seeds: the live pixels are the unflipped or the mirrored ones exactly as ``drawn_flip``
    says (both kinds occur), and the cached posterior of that item equals encoding those pixels
    (to round-off; the other orientation is far off)."""
    ds, ic, vae, dataset = parts(tiny_model_dir, tiny_data_dir)
    cache = build(ds, ic, vae, dataset, tmp_path)
    plain = dataset.__getitems__([(0, ec.FLIP_SEEDS[False])])[0]["pixel_values"]
    flips = []
    for seed in range(40):
        live = dataset.__getitems__([(0, seed)])[0]["pixel_values"]
        flips.append(ec.drawn_flip(seed))
        assert torch.equal(live, plain.flip(-1) if flips[-1] else plain)
        with torch.no_grad():
            dist = vae.encode(live[None]).latent_dist
        entry = cache.entry(0, seed)
        # encoded alone here, in batches of 8 in the cache: CPU kernels differ by batch size, so round-off
        torch.testing.assert_close(entry["mean"], dist.mean[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(entry["std"], dist.std[0], rtol=1e-4, atol=1e-5)
        other = cache.entry(0, ec.FLIP_SEEDS[not flips[-1]])
        assert (other["mean"] - dist.mean[0]).abs().max() > 1e-3
    assert 5 < sum(flips) < 35


def test_sdxl_dataset_flips_on_the_same_draw(tiny_model_dir, tiny_data_dir):
    """The SDXL recipe's dataset flips (before its crop) on the draw ``drawn_flip`` reads."""
    from types import SimpleNamespace

    from transformers import CLIPTokenizer

    from sd_memfree.data import load_image_caption_dataset
    from train_scripts.train_sdxl_ietagc import SDXLCaptionDataset

    ds, ic, cc = load_image_caption_dataset(train_data_dir=str(tiny_data_dir))
    args = SimpleNamespace(resolution=16, center_crop=True, random_flip=True, image_interpolation_mode="lanczos", proportion_empty_prompts=0)
    tok = CLIPTokenizer.from_pretrained(tiny_model_dir, subfolder="tokenizer")
    sdxl = SDXLCaptionDataset(ds, ic, cc, [tok, tok], args, seed=0)
    plain = sdxl.__getitems__([(1, ec.FLIP_SEEDS[False])])[0]["pixel_values"]
    mirrored = sdxl.__getitems__([(1, ec.FLIP_SEEDS[True])])[0]["pixel_values"]
    assert not torch.equal(plain, mirrored)
    for seed in range(20):
        live = sdxl.__getitems__([(1, seed)])[0]["pixel_values"]
        assert torch.equal(live, mirrored if ec.drawn_flip(seed) else plain)


def test_cache_is_reused_and_rebuilt_for_what_changed(tiny_model_dir, tiny_data_dir, tmp_path):
    """Second build: nothing encoded. Another resolution or VAE: everything, in another folder.
    One image's bytes changed: that image only."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data_dir, data)
    ds, ic, vae, dataset = parts(tiny_model_dir, data)
    first = build(ds, ic, vae, dataset, tmp_path / "c")
    distinct = first.stats["entries"]
    assert first.stats["built"] == distinct and distinct >= 2
    assert build(ds, ic, vae, dataset, tmp_path / "c").stats["built"] == 0

    ds16, _, _, dataset16 = parts(tiny_model_dir, data, resolution=16)
    other = build(ds16, ic, vae, dataset16, tmp_path / "c", resolution=16)
    assert other.stats["built"] == distinct and other.store.folder != first.store.folder

    weight = next(vae.parameters())
    saved = weight.detach().clone()
    with torch.no_grad():
        weight.add_(1e-3)
    changed_vae = build(ds, ic, vae, dataset, tmp_path / "c")
    assert changed_vae.stats["built"] == distinct and changed_vae.store.folder not in (first.store.folder, other.store.folder)
    with torch.no_grad():
        weight.copy_(saved)

    from PIL import Image

    image = sorted(p for p in data.iterdir() if p.suffix == ".png")[0]
    Image.new("RGB", (32, 32), (200, 10, 10)).save(image)
    ds2, _, _, dataset2 = parts(tiny_model_dir, data)
    rebuilt = build(ds2, ic, vae, dataset2, tmp_path / "c")
    assert rebuilt.store.folder == first.store.folder and rebuilt.stats["built"] == 1


def test_corrupt_files_are_found_and_rebuilt_with_one_line(tiny_model_dir, tiny_data_dir, tmp_path, caplog):
    ds, ic, vae, dataset = parts(tiny_model_dir, tiny_data_dir)
    cache = build(ds, ic, vae, dataset, tmp_path)
    truncated, flipped = cache.store.path(cache.names[0]), cache.store.path(next(n for n in cache.names if n != cache.names[0]))
    good = {p: p.read_bytes() for p in (truncated, flipped)}
    truncated.write_bytes(good[truncated][: len(good[truncated]) // 2])
    data = bytearray(good[flipped])
    data[-5] ^= 0xFF  # inside the tensor bytes: the header still parses
    flipped.write_bytes(bytes(data))
    with caplog.at_level("WARNING", logger="sd_memfree.encoder_cache"):
        again = build(ds, ic, vae, dataset, tmp_path)
    assert again.stats["corrupt"] == 2 and again.stats["built"] == 2
    lines = [r.getMessage() for r in caplog.records if "rebuilding it" in r.getMessage()]
    assert len(lines) == 2 and all("\n" not in line for line in lines)
    assert any("do not match the checksum" in line for line in lines)
    assert {p: p.read_bytes() for p in good} == good  # rebuilt to the very same bytes


def test_cache_store_roundtrip_and_missing(tmp_path):
    store = CacheStore(tmp_path)
    t = {"a": torch.arange(6, dtype=torch.float16).reshape(2, 3), "b": torch.tensor([3, 4])}
    store.write("ab12", t)
    back, status = store.status("ab12")
    assert status == "ok" and torch.equal(back["a"], t["a"]) and torch.equal(back["b"], t["b"])
    assert store.status("cd34") == (None, "missing")
    assert not list(tmp_path.rglob("*.tmp"))
    with pytest.raises(RuntimeError, match="missing .*start the run again"):
        store.load("cd34")


BUILDER = """
import sys, torch
sys.path.insert(0, {repo!r}); sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
from test_encoder_cache import build, parts
ds, ic, vae, dataset = parts({model!r}, {data!r})
cache = build(ds, ic, vae, dataset, {root!r}, batch_size=1)
print(cache.stats["built"])
"""


def test_two_concurrent_builders_leave_a_correct_cache(tiny_model_dir, tiny_data_dir, tmp_path):
    """Two processes build the same cache at the same time: both finish, every file is whole and
    holds what a lone build writes."""
    code = BUILDER.format(repo=str(REPO), tests=str(REPO / "tests"), model=str(tiny_model_dir), data=str(tiny_data_dir),
                          root=str(tmp_path / "shared"))
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    ds, ic, vae, dataset = parts(tiny_model_dir, tiny_data_dir)
    shared = build(ds, ic, vae, dataset, tmp_path / "shared")
    assert shared.stats["built"] == 0 and shared.stats["corrupt"] == 0
    alone = build(ds, ic, vae, dataset, tmp_path / "alone", batch_size=1)  # as the builders: the same kernels
    for name in set(alone.names):
        assert shared.store.path(name).read_bytes() == alone.store.path(name).read_bytes()
    assert not list((tmp_path / "shared").rglob("*.tmp"))


def test_resume_with_cache_equals_straight_cached_run(tiny_model_dir, tiny_data_dir, tmp_path, caplog):
    """4 cached steps straight == 2 cached steps, checkpoint, resume (reusing the cache), 2 more.
    The log says how big the checkpoint is (disk_size), and that the resumed run encoded nothing."""
    from train_scripts import train_sd_ietagc as train

    cache = ["--cache_latents", "--cache_text_embeddings", f"--latent_cache_dir={tmp_path / 'cache'}"]
    train.main(train.parse_args(sd_args(tiny_model_dir, tiny_data_dir, tmp_path / "straight", *cache)))
    with caplog.at_level("INFO"):
        train.main(train.parse_args(sd_args(tiny_model_dir, tiny_data_dir, tmp_path / "first", *cache, "--checkpointing_steps=2")))
    from sd_memfree.run.disk_size import folder_bytes, human_bytes

    size = human_bytes(folder_bytes(tmp_path / "first" / "checkpoint-2"))
    assert any(r.getMessage().endswith(f"Saved checkpoint-2 ({size})") for r in caplog.records)  # after accelerate's rank prefix
    caplog.clear()
    with caplog.at_level("INFO"):
        train.main(train.parse_args(sd_args(tiny_model_dir, tiny_data_dir, tmp_path / "resumed", *cache,
                                            f"--resume_from_checkpoint={tmp_path / 'first' / 'checkpoint-2'}")))
    assert any("encoded 0 now" in r.getMessage() for r in caplog.records)
    assert_same(final(tmp_path / "straight", False), final(tmp_path / "resumed", False))


def test_each_process_encodes_its_slice_then_fills_what_is_missing(tiny_model_dir, tiny_data_dir, tmp_path):
    """Rank 0 of 2 encodes every other distinct image before the barrier; after it, a file the other
    process did not write (no shared disk, here: no other process) is encoded by rank 0 itself."""
    ds, ic, vae, dataset = parts(tiny_model_dir, tiny_data_dir)
    at_barrier = []
    cache = build(ds, ic, vae, dataset, tmp_path, rank=0, world=2,
                  barrier=lambda: at_barrier.append(sorted(p.stem for p in tmp_path.rglob("*.safetensors"))))
    unique = sorted(set(cache.names))
    assert at_barrier == [unique[0::2]]
    assert cache.stats["built"] == len(unique) and all(cache.store.path(n).exists() for n in unique)


@pytest.mark.multiprocess
def test_two_processes_build_the_cache_together_and_train_as_one(tiny_model_dir, tiny_data_dir, tmp_path):
    """torchrun, 2 processes (one proxy each, K=2), both caches, empty cache folder: each process
    encodes its half and they meet at the barrier; the cache then holds every image whole, and the
    weights equal a 1-process run of the same settings with a live VAE and text encoder (the draws
    are the proxies', not the processes'), to round-off."""
    from test_scale import launch, max_difference, run_args, weights

    extra = ["--num_shards=2", "--merge_every=2", "--center_crop", "--random_flip"]
    cache = ["--cache_latents", "--cache_text_embeddings", f"--latent_cache_dir={tmp_path / 'cache'}"]
    launch(2, run_args(tiny_model_dir, tiny_data_dir, tmp_path / "two", *extra, *cache, batch=2))
    launch(1, run_args(tiny_model_dir, tiny_data_dir, tmp_path / "one", *extra, batch=2))
    assert max_difference(weights(tmp_path / "two", False), weights(tmp_path / "one", False)) <= 1e-5
    files = list((tmp_path / "cache" / "latents").rglob("*.safetensors"))
    assert len(files) == len({p.read_bytes() for p in (tiny_data_dir).glob("*.png")})  # one per distinct image
    assert all(CacheStore(f.parent.parent).status(f.stem)[1] == "ok" for f in files)
