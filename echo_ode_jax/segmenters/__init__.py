"""2D segmenters (stage 1 of Echo-ODE, and the per-frame baselines).

All models map images (B, H, W, 1) to logits (B, H, W, 4) for background, LV
cavity, myocardium, LA, and take ``train`` (BatchNorm batch statistics and
dropout when True; running averages when False).

  get_model(name, **kw)   "unet" | "enet" | "deeplabv3" -> flax module
"""
from __future__ import annotations

import flax.linen as nn

from echo_ode_jax.segmenters.deeplabv3 import DeepLabV3
from echo_ode_jax.segmenters.enet import ENet
from echo_ode_jax.segmenters.unet import UNet

MODELS = {"unet": UNet, "enet": ENet, "deeplabv3": DeepLabV3}


def get_model(name: str, **kw) -> nn.Module:
  """Returns the segmenter `name` (see MODELS) built with keyword options `kw`."""
  if name not in MODELS:
    raise ValueError(f"unknown segmenter {name!r}; choose from {sorted(MODELS)}")
  return MODELS[name](**kw)


__all__ = ["DeepLabV3", "ENet", "MODELS", "UNet", "get_model"]
