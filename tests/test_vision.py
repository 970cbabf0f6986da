"""timm and torchvision models (no weights) through their presets: train, merge, export to
PEFT, import back."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
import torch.nn.functional as F

import geopeft


def timm_vit():
    import timm

    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                             embed_dim=32, depth=2, num_heads=2, num_classes=3)


def timm_resnet():
    import timm

    return timm.create_model("resnet18", pretrained=False, num_classes=3)


def tv_resnet18():
    from torchvision.models import resnet18

    return resnet18(weights=None, num_classes=3)


def tv_vit():
    """vit_b_16's class and module names at 2 layers of width 32 (vit_b_16 itself, 86M
    parameters, costs ~12 s here for the same check)."""
    from torchvision.models import VisionTransformer

    return VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=2, hidden_dim=32,
                             mlp_dim=48, num_classes=3)


#: builder, preset, adapted modules (count), trained head, image size
MODELS = {
    "timm-vit": (timm_vit, "timm-vit", 2 * 3, "head", 32),
    "timm-resnet": (timm_resnet, "timm-resnet", 8 * 2, "fc", 16),
    "torchvision-resnet18": (tv_resnet18, "torchvision-resnet", 8 * 2, "fc", 16),
    "torchvision-vit": (tv_vit, "torchvision-vit", 2 * 2, "heads", 32),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_vision_model_trains_merges_and_exports(name, tmp_path):
    build, preset, count, head, size = MODELS[name]
    torch.manual_seed(0)
    model = build().eval()  # eval: BatchNorm statistics stay those of the base model
    fresh, fresh2 = copy.deepcopy(model), copy.deepcopy(model)
    assert geopeft.targets.preset_for(model).name == preset
    geopeft.adapt(model, "lora", rank=2, trainable=[head])
    assert len(geopeft.adapters(model)) == count
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 3, size, size, generator=g), torch.tensor([0, 1, 2, 0])
    opt = geopeft.optimizer(model, torch.optim.AdamW, lr=1e-2)
    losses = []
    for _ in range(5):
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    with torch.no_grad():
        out = model(x)
        geopeft.merge(model)
        assert torch.allclose(model(x), out, rtol=1e-4, atol=1e-5)
        geopeft.unmerge(model)
    geopeft.export_peft(model, tmp_path)
    loaded = peft.PeftModel.from_pretrained(fresh, str(tmp_path)).eval()
    loaded.save_pretrained(tmp_path / "peft")
    back = geopeft.import_peft(fresh2, tmp_path / "peft").eval()  # Conv2d and fused qkv back in
    with torch.no_grad():
        assert torch.allclose(loaded(x), out, rtol=1e-4, atol=1e-5)
        assert torch.allclose(back(x), out, rtol=1e-4, atol=1e-5)
