"""--resolution: the check accepts exactly the sizes the VAE and UNet train at.

Measured here on real diffusers modules: the VAE encoder floors the size through its padded
stride-2 convs (latent = resolution // vae_scale_factor, >= 1 needed); the UNet takes any latent
size, because UNet2DConditionModel.forward forwards upsample_size when the latent is not divisible
by 2**num_upsamplers. The old rule (a multiple of vae_scale_factor * 2**(UNet levels - 1)) refused
30 and 34 on the tiny model and would demand a multiple of 64 on SD 2.1.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from helpers import train_argv
from sd_memfree.data import DataError, check_resolution
from train_scripts import train_sd_ietagc as train


def sd_shaped(vae_levels: int, unet_levels: int, ch: int = 8):
    """SD's layout (VAE: 4 levels, factor 8; UNet: 4 levels, 3 downsamplers) with tiny channels."""
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(ch,) * vae_levels, down_block_types=("DownEncoderBlock2D",) * vae_levels,
                        up_block_types=("UpDecoderBlock2D",) * vae_levels, latent_channels=4, layers_per_block=1, norm_num_groups=4)
    unet = UNet2DConditionModel(block_out_channels=(ch,) * unet_levels, layers_per_block=1, norm_num_groups=4, cross_attention_dim=8,
                                attention_head_dim=4, down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (unet_levels - 1),
                                up_block_types=("CrossAttnUpBlock2D",) * (unet_levels - 1) + ("UpBlock2D",))
    return vae, unet


def trains(vae, unet, resolution: int) -> bool:
    """One training step's forward and backward at this resolution; output shaped like the latent."""
    try:
        with torch.no_grad():
            latents = vae.encode(torch.randn(1, 3, resolution, resolution)).latent_dist.sample()
        pred = unet(latents, torch.tensor([10]), torch.randn(1, 3, 8)).sample
        pred.mean().backward()
    except RuntimeError:
        return False
    return pred.shape == latents.shape


def accepted(resolution: int, factor: int) -> bool:
    try:
        check_resolution(resolution, factor)
    except DataError:
        return False
    return True


@pytest.mark.parametrize(
    "vae_levels, unet_levels, sizes",
    [
        (2, 2, [1, 2, 3, 30, 34]),  # the tiny model's layout: factor 2
        (4, 4, [7, 8, 9, 72, 100]),  # SD 1.x/2.x layout: factor 8; 72 and 100 are not multiples of 64
    ],
)
def test_check_accepts_exactly_what_trains(vae_levels, unet_levels, sizes):
    vae, unet = sd_shaped(vae_levels, unet_levels)
    factor = 2 ** (vae_levels - 1)
    measured = {r: trains(vae, unet, r) for r in sizes}
    assert measured == {r: accepted(r, factor) for r in sizes}
    assert measured == {r: r >= factor for r in sizes}  # hand-written: only the VAE's minimum matters


def test_sd_sizes_are_not_held_to_multiples_of_64():
    """SD's VAE downsamples by 8: every size from 8 on is accepted, multiple of 64 or not; 7 is not."""
    sizes = (7, 8, 200, 520, 768, 1000)
    assert {r: accepted(r, 8) for r in sizes} == {7: False, 8: True, 200: True, 520: True, 768: True, 1000: True}


def test_generating_needs_multiples_of_8():
    """StableDiffusionPipeline.check_inputs refuses other sizes, so validation prompts need them."""
    check_resolution(32, 2, generates_images=True)
    with pytest.raises(DataError, match=r"--resolution=30 trains, but .* multiple of 8 \(e\.g\. 24 or 32\)"):
        check_resolution(30, 2, generates_images=True)
    with pytest.raises(DataError, match=r"--resolution=4 .* \(e\.g\. 8 or 16\)"):
        check_resolution(4, 2, generates_images=True)


@pytest.mark.parametrize("resolution", [30, 34])
def test_tiny_model_trains_at_sizes_the_old_check_refused(tiny_model_dir, tiny_data_dir, tmp_path, resolution):
    summary = train.main(train.parse_args(train_argv(tiny_model_dir, tiny_data_dir, tmp_path / "o", "--use_lora", steps=1,
                                                     resolution=resolution, learning_rate=None, checkpointing_steps=None)))
    assert summary["global_step"] == 1
