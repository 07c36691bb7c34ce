"""docs/plugin.md's example runs as written, and a loop built on ``MemFree`` trains the weights
that ``train_sd_ietagc.py`` trains with the same flags, bit for bit (the plugin reproduces the
script's method code operation by operation and its random streams)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import scaled_accelerator
from sd_memfree import MemFreeConfig
from train_scripts import train_sd_ietagc as train

REPO = Path(__file__).resolve().parents[1]


def doc_example() -> dict:
    """The first ```python block of docs/plugin.md, executed as a module (not as __main__)."""
    text = (REPO / "docs" / "plugin.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    namespace = {"__name__": "plugin_doc_example"}
    exec(compile(code, "docs/plugin.md", "exec"), namespace)
    return namespace


METHOD = dict(num_shards=2, merge_every=2, agc_ratio=1.02, agc_ema=0.1, redistribute_fraction=0.5, loss_aware_augmentation=True)


def script_flags(config: MemFreeConfig) -> list[str]:
    flags = []
    for key, value in config.to_dict().items():
        if isinstance(value, bool):
            flags += [f"--{key}"] if value else []
        else:
            flags.append(f"--{key}={value}")
    return flags


@pytest.mark.parametrize("method", [METHOD, {}], ids=["shards-agc-redistribution-augmentation", "off"])
def test_doc_example_equals_the_sd_script_bit_for_bit(model20, tiny_data_dir, tmp_path, method):
    config = MemFreeConfig(**method)
    steps, seed = 12, 3
    out = tmp_path / "script"
    summary = train.main(train.parse_args([
        f"--pretrained_model_name_or_path={model20}", f"--train_data_dir={tiny_data_dir}", f"--output_dir={out}",
        "--resolution=32", "--train_batch_size=4", f"--max_train_steps={steps}", "--learning_rate=1e-3",
        "--lr_warmup_steps=0", f"--seed={seed}", "--report_to=none", "--checkpointing_steps=1000000",
        *script_flags(config)]))
    unet, memfree = doc_example()["train"](str(model20), str(tiny_data_dir), config, max_train_steps=steps,
                                           resolution=32, batch_size=4, learning_rate=1e-3, seed=seed)
    expected = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    got = unet.state_dict()
    assert expected.keys() == got.keys()
    different = [k for k in expected if not torch.equal(expected[k], got[k].cpu())]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    state = json.loads((out / "memfree_state.json").read_text())
    mine = memfree.summary()
    assert mine["num_merges"] == state["num_merges"] == (3 if method else 0)  # 12 steps / (2 proxies x 2 steps)
    assert mine["shard_of"] == state["shard_of"] and mine["moves"] == state["moves"]
    if method:
        assert state["moves"], "redistribution moved nothing: the comparison would not cover it"
        assert 0 < mine["agc/skip_rate"] < 1 and mine["agc/skip_rate"] == pytest.approx(summary["agc/skip_rate"])


def test_the_docs_state_how_many_lines_each_recipe_tags():
    """docs/plugin.md (and design.md) give the number of lines tagged ``# [memfree]`` in each
    recipe: the count of code lines carrying the tag (the docstring's mention is not one)."""
    def tagged(script: str) -> int:
        text = (REPO / "train_scripts" / script).read_text()
        return sum(1 for line in text.splitlines() if re.search(r"[^`]\s# \[memfree\]", line))

    plugin = (REPO / "docs" / "plugin.md").read_text()
    sd = int(re.search(r"train_sd_ietagc\.py`[^\n]*\n?[^\n]*?: (\d+) tagged", plugin).group(1))
    sdxl = int(re.search(r"train_sdxl_ietagc\.py`[^\n]*?the same (\d+)\s+tagged", plugin).group(1))
    design = int(re.search(r"\((\d+) in the SD script\)", (REPO / "docs" / "design.md").read_text()).group(1))
    assert tagged("train_sd_ietagc.py") == sd == design
    assert tagged("train_sdxl_ietagc.py") == sdxl


def test_doc_example_in_half_precision_with_a_skipped_step_equals_the_sd_script(model20, tiny_data_dir, tmp_path, monkeypatch):
    """bf16 autocast with a loss scaler whose first step overflows (emulated on the CPU): the
    example and the script both skip step 1 without stepping the LR warm-up, and train the same
    bits. (A loop stepping its LR scheduler regardless would be a warm-up step ahead.)"""
    import accelerate
    from accelerate.state import AcceleratorState

    skipped: list = []
    monkeypatch.setattr(accelerate, "Accelerator", scaled_accelerator(skipped))
    AcceleratorState._reset_state(True)  # earlier tests in this process set up accelerate without mixed precision
    try:
        _compare_half_precision(model20, tiny_data_dir, tmp_path, skipped)
    finally:
        AcceleratorState._reset_state(True)


def _compare_half_precision(model20, tiny_data_dir, tmp_path, skipped):
    config = MemFreeConfig(**METHOD)
    steps, seed = 8, 3
    out = tmp_path / "script"
    train.main(train.parse_args([
        f"--pretrained_model_name_or_path={model20}", f"--train_data_dir={tiny_data_dir}", f"--output_dir={out}",
        "--resolution=32", "--train_batch_size=4", f"--max_train_steps={steps}", "--learning_rate=1e-3",
        "--lr_scheduler=constant_with_warmup", "--lr_warmup_steps=3", "--mixed_precision=bf16", f"--seed={seed}",
        "--report_to=none", "--checkpointing_steps=1000000", *script_flags(config)]))
    script_skips, skipped[:] = list(skipped), []
    unet, _ = doc_example()["train"](str(model20), str(tiny_data_dir), config, max_train_steps=steps, resolution=32,
                                     batch_size=4, learning_rate=1e-3, seed=seed, lr_warmup_steps=3, mixed_precision="bf16")
    assert script_skips == skipped == [True] + [False] * (steps - 1)
    expected = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    different = [k for k, v in unet.state_dict().items() if not torch.equal(expected[k], v.cpu())]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def test_doc_example_resumes_where_its_checkpoint_was_taken(model20, tiny_data_dir, tmp_path):
    """The example saves its state at step 6 of 12 (mid-round, after a redistribution); a new run
    that loads it goes on from step 6, not 0, and ends with the straight run's weights, bit for
    bit."""
    config = MemFreeConfig(**METHOD)
    example = doc_example()["train"]
    common = dict(max_train_steps=12, resolution=32, batch_size=4, learning_rate=1e-3, seed=3)
    straight, _ = example(str(model20), str(tiny_data_dir), config, checkpoint_at=6, checkpoint_dir=str(tmp_path / "ckpt"), **common)
    resumed, memfree = example(str(model20), str(tiny_data_dir), config, resume_from=str(tmp_path / "ckpt"), **common)
    assert memfree.global_step == 12 and memfree.summary()["num_merges"] == 3
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
