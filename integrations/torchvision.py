"""torchvision: target presets for ResNet and ViT, matched by the model's class name
(importing this module does not import torchvision).

ResNets (resnet18 … resnet152, ResNeXt's grouped convs excepted): the convolutions
inside the residual blocks. ViTs (vit_b_16 …): the MLP linears `mlp.0`, `mlp.3`. Their
attention is an `nn.MultiheadAttention`, whose fused input projection is a parameter,
not a layer, and whose `out_proj` it never calls: neither can carry an adapter.
"""

from __future__ import annotations

from geopeft import TargetPreset

from ._plugin import RESNET_BLOCK_CONVS, preset_hook

PRESETS = [
    TargetPreset("torchvision-resnet", RESNET_BLOCK_CONVS,
                 classes=("torchvision.models.resnet.ResNet",),
                 description="torchvision ResNet: the residual blocks' convolutions"),
    TargetPreset("torchvision-vit", ("mlp.0", "mlp.3"),
                 classes=("torchvision.models.vision_transformer.VisionTransformer",),
                 description="torchvision ViT: the MLP linears mlp.0, mlp.3"),
]

register_target_presets = preset_hook(PRESETS)
