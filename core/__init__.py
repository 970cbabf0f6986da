"""geopeft: geometry-aware low-rank fine-tuning for PyTorch.

    import geopeft
    model = geopeft.adapt(model, method="lora", targets=["query", "value"], rank=8, alpha=16)
    opt = geopeft.optimizer(model, torch.optim.AdamW, lr=1e-3)
    geopeft.save(model, "out/");  model = geopeft.load(base_model, "out/")
"""

from __future__ import annotations

from .errors import (
    CheckpointError,
    ConfigError,
    GeopeftError,
    IncompatibleComponentsError,
    PluginError,
    ShapeError,
    TargetError,
    UnknownComponentError,
)
from .hookspecs import hookimpl
from .interfaces import (
    Adapter,
    GradientTransform,
    Initializer,
    Manifold,
    RankController,
    Recipe,
    TargetPreset,
)

__version__ = "0.1.0"


def components() -> dict[str, list[str]]:
    """Registered component names by kind: adapter, manifold, gradient_transform,
    rank_controller, initializer, method."""
    from .registry import get_registry

    return get_registry().components()


# imported after the interfaces: these modules use them
from .export import export_peft  # noqa: E402
from .model import adapt, adapters, disable_adapters, merge, unload, unmerge  # noqa: E402
from .optim import GeometricOptimizer, optimizer  # noqa: E402
from .peft_import import import_peft  # noqa: E402
from .serialization import load, save  # noqa: E402

__all__ = [
    "Adapter", "CheckpointError", "ConfigError", "GeometricOptimizer", "GeopeftError",
    "GradientTransform", "IncompatibleComponentsError", "Initializer", "Manifold", "PluginError",
    "RankController", "Recipe", "ShapeError", "TargetError", "TargetPreset", "UnknownComponentError",
    "adapt", "adapters", "components", "disable_adapters", "export_peft", "hookimpl", "import_peft",
    "load", "merge", "optimizer", "save", "unload", "unmerge",
]
