"""Which UNet parameters train (full fine-tuning or LoRA via peft) and how they are saved.

Invariants:
- ``trainable_parameters(unet)`` lists exactly the tensors the optimizer updates; these and only
  these are what shard proxies copy and merge.
- Outputs are native diffusers artefacts: a full pipeline folder (``from_pretrained``) or
  ``pytorch_lora_weights.safetensors`` (``load_lora_weights``).
"""

from __future__ import annotations

from pathlib import Path

import torch

LORA_TARGET_MODULES = ["to_k", "to_q", "to_v", "to_out.0"]


def add_lora(unet, rank: int) -> None:
    """Attach LoRA adapters to the attention projections, as diffusers' LoRA script does."""
    from peft import LoraConfig

    if rank < 1:
        raise ValueError(f"--rank must be >= 1, got {rank}.")
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=LORA_TARGET_MODULES))


def trainable_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def upcast_trainable_(module: torch.nn.Module) -> None:
    """Keep trainable (LoRA) tensors in float32 when the frozen weights run in fp16/bf16.

    Driven by accelerate's resolved mixed-precision mode (which may come from ``accelerate
    config``), not only from the ``--mixed_precision`` flag as upstream does.
    """
    for p in trainable_parameters(module):
        p.data = p.data.float()


def lora_state_dict(unet) -> dict[str, torch.Tensor]:
    """The LoRA tensors in diffusers' naming, as ``save_lora_weights`` expects them."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))


def save_lora(unet, output_dir: str | Path) -> Path:
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline.save_lora_weights(save_directory=str(output_dir), unet_lora_layers=lora_state_dict(unet),
                                              safe_serialization=True)
    return Path(output_dir) / "pytorch_lora_weights.safetensors"


def save_full_pipeline(unet, pretrained_model_name_or_path: str, output_dir: str | Path, revision=None, variant=None,
                       text_encoder=None, vae=None) -> Path:
    """Save a complete pipeline folder whose UNet is ``unet``; every other part comes from the base
    model as it is, the safety checker and feature extractor included when the base has them (as
    upstream's script saves it: a fine-tune must not silently drop a base model's safety checker).
    """
    from diffusers import StableDiffusionPipeline

    kwargs = {k: v for k, v in {"text_encoder": text_encoder, "vae": vae}.items() if v is not None}
    pipe = StableDiffusionPipeline.from_pretrained(pretrained_model_name_or_path, unet=unet, revision=revision,
                                                   variant=variant, **kwargs)
    pipe.save_pretrained(str(output_dir), safe_serialization=True)
    return Path(output_dir)


def save_checkpoint_model(unet, folder: str | Path, is_lora: bool, trainable: list[torch.Tensor] | None = None) -> None:
    """Write ``unet`` into a checkpoint folder in the final output's form, as diffusers' scripts do:
    full fine-tuning -> ``folder/unet`` (``UNet2DConditionModel.from_pretrained(folder, subfolder="unet")``),
    LoRA -> ``folder/pytorch_lora_weights.safetensors`` (``pipe.load_lora_weights(folder)``).

    Args:
        trainable: values to write instead of ``trainable_parameters(unet)``, in that order (the
            merged weights of shard proxies while the live parameters hold a proxy's). Written
            from views, without copying the model.
    """
    from safetensors.torch import save_file

    state = unet.state_dict()
    if trainable is not None:
        names = [n for n, p in unet.named_parameters() if p.requires_grad]
        for name, value in zip(names, trainable, strict=True):
            state[name] = value.view(state[name].shape).to(state[name].dtype)
    folder = Path(folder)
    if is_lora:
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, state_dict=state))
        StableDiffusionPipeline.save_lora_weights(save_directory=str(folder), unet_lora_layers=layers, safe_serialization=True)
    else:
        (folder / "unet").mkdir(parents=True, exist_ok=True)
        unet.save_config(folder / "unet")
        save_file({k: v.detach().contiguous() for k, v in state.items()}, str(folder / "unet" / "diffusion_pytorch_model.safetensors"),
                  metadata={"format": "pt"})


def kohya_lora_state_dict(unet, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The UNet's LoRA in the kohya format that AUTOMATIC1111 and ComfyUI load
    (``lora_unet_<module>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``), by diffusers'
    own converter (``convert_state_dict_to_kohya``).

    Args:
        unet: a UNet with a peft LoRA adapter (``add_lora``).
        state: values to convert instead of the UNet's own (e.g. a merge's, see
            ``save_checkpoint_model``); None reads ``unet.state_dict()``.
    """
    from diffusers.utils import convert_state_dict_to_kohya
    from peft.utils import get_peft_model_state_dict

    peft_layers = get_peft_model_state_dict(unet, state_dict=state) if getattr(unet, "peft_config", None) else {}
    if not peft_layers:
        raise ValueError("the UNet has no LoRA adapter to convert; kohya export applies to LoRA training (--use_lora).")
    # The "unet." prefix is how the converter tells UNet layers (lora_unet_*) from text encoders'.
    return convert_state_dict_to_kohya({f"unet.{k}": v.detach().contiguous() for k, v in peft_layers.items()})


def save_kohya_lora(unet, path: str | Path, state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``kohya_lora_state_dict(unet, state)`` as one safetensors file (A1111 / ComfyUI's
    ``models/loras``); returns the path."""
    from safetensors.torch import save_file

    path = Path(path)
    save_file(kohya_lora_state_dict(unet, state), str(path), metadata={"format": "pt"})
    return path
