"""timm: target presets by architecture family, matched by the model's class name
(importing this module does not import timm).

ViTs (and DeiT, which subclass them) and Swin: the fused `qkv` projection and the
MLP's `fc1`, `fc2`; ConvNeXt: the MLP linears (its depthwise convolutions are grouped,
which geopeft does not adapt); ResNets: the convolutions inside the residual blocks
(not the stem, not the 1×1 downsampling shortcuts).
"""

from __future__ import annotations

from geopeft import TargetPreset

from ._plugin import RESNET_BLOCK_CONVS, preset_hook

PRESETS = [
    TargetPreset("timm-vit", ("attn.qkv", "mlp.fc1", "mlp.fc2"),
                 classes=("timm.models.vision_transformer.VisionTransformer",
                          "timm.models.swin_transformer.SwinTransformer"),
                 description="timm ViT / DeiT / Swin: attn.qkv, mlp.fc1, mlp.fc2"),
    TargetPreset("timm-convnext", ("mlp.fc1", "mlp.fc2"), classes=("timm.models.convnext.ConvNeXt",),
                 description="timm ConvNeXt: mlp.fc1, mlp.fc2"),
    TargetPreset("timm-resnet", RESNET_BLOCK_CONVS, classes=("timm.models.resnet.ResNet",),
                 description="timm ResNet: the residual blocks' convolutions"),
]

register_target_presets = preset_hook(PRESETS)
