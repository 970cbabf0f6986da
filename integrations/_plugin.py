"""What the preset modules share: the hook that registers their presets."""

from __future__ import annotations

from collections.abc import Sequence

from geopeft import TargetPreset, hookimpl

#: the convolutions inside ResNet residual blocks (timm's and torchvision's share the names)
RESNET_BLOCK_CONVS = r"layer\d+\.\d+\.conv\d"


def preset_hook(presets: Sequence[TargetPreset]):
    """A `register_target_presets` hook implementation registering `presets`; assign it
    to that name in the plugin module."""

    @hookimpl
    def register_target_presets(register):
        for preset in presets:
            register(preset.name, preset)

    return register_target_presets
