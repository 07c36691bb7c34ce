"""LoRA in the kohya format (AUTOMATIC1111 / ComfyUI) via diffusers' converter, loaded back."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from sd_memfree.trainable import add_lora, save_kohya_lora, save_lora


def test_kohya_file_loads_back_as_the_same_lora(tiny_model_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    add_lora(pipe.unet, 4)
    torch.manual_seed(0)
    with torch.no_grad():  # lora_B starts at 0: make the adapter change the output
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    save_lora(pipe.unet, tmp_path / "diffusers")
    path = save_kohya_lora(pipe.unet, tmp_path / "kohya.safetensors")

    keys = load_file(path)
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    downs = [k for k in keys if k.endswith(".lora_down.weight")]
    assert len(downs) == len([k for k in keys if k.endswith(".lora_up.weight")]) == len([k for k in keys if k.endswith(".alpha")])
    assert all(keys[k.replace(".lora_down.weight", ".alpha")].item() == 4 for k in downs)  # alpha = rank, as trained

    x, t = torch.randn(1, 4, 8, 8), 5
    text = torch.randn(1, 77, pipe.text_encoder.config.hidden_size)
    outputs = []
    for source in (tmp_path / "diffusers", path):
        loaded = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
        loaded.load_lora_weights(str(source))
        with torch.no_grad():
            outputs.append(loaded.unet(x, t, text).sample)
    with torch.no_grad():
        base = StableDiffusionPipeline.from_pretrained(tiny_model_dir).unet(x, t, text).sample
    assert (outputs[0] - base).abs().max() > 1e-3  # the adapter matters
    assert torch.allclose(outputs[0], outputs[1], atol=1e-6)


def test_kohya_export_of_a_model_without_lora_is_refused(tiny_model_dir, tmp_path):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    with pytest.raises(ValueError, match="no LoRA adapter"):
        save_kohya_lora(unet, tmp_path / "x.safetensors")
