"""TransASPP-UNet segmentation model and its presets."""

from typing import Any

from raysemi.model.transaspp_unet import PRESETS, SIZE_DIVISOR, TransASPPUNet, build_model


def build_model_from_config(model_cfg: Any) -> TransASPPUNet:
    """Build the model a :class:`raysemi.config.ModelConfig` describes (preset + dropout override)."""
    overrides = {} if model_cfg.dropout is None else {"dropout": model_cfg.dropout}
    return build_model(model_cfg.preset, **overrides)


__all__ = ["PRESETS", "SIZE_DIVISOR", "TransASPPUNet", "build_model", "build_model_from_config"]
