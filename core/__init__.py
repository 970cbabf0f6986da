"""geopeft: geometry-aware low-rank fine-tuning for PyTorch.

    import geopeft
    model = geopeft.adapt(model, method="lora", targets=["query", "value"], rank=8, alpha=16)
    opt = geopeft.optimizer(model, torch.optim.AdamW, lr=1e-3)
    geopeft.save(model, "out/");  model = geopeft.load(base_model, "out/")
"""

from __future__ import annotations

from typing import Any

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
    RankChange,
    RankController,
    Recipe,
    TargetPreset,
)
from .layers import Quantization

__version__ = "0.1.0"


def components() -> dict[str, list[str]]:
    """Registered component names by kind: adapter, manifold, gradient_transform,
    rank_controller, initializer, method, target_preset, quantization."""
    from .registry import get_registry

    return get_registry().components()


def register(kind: str, name: str, obj: Any, *, replace: bool = False) -> Any:
    """Register a component defined in your own code, so recipes, `adapt` and `load`
    find it by `name` — as a plugin's would be (same checks: `obj` is a subclass of the
    kind's interface, or a `Recipe` for kind "method"; the name is not taken).

        geopeft.register("manifold", "unit_columns", UnitColumns)
        geopeft.register("method", "my_lora", geopeft.Recipe(name="my_lora", ...))

    kind: adapter, manifold, gradient_transform, rank_controller, initializer, method,
    target_preset or quantization.
    `replace=True` replaces your own earlier registration of `name`. Returns `obj`."""
    from .registry import get_registry

    get_registry().register(kind, name, obj, replace=replace)
    return obj


def unregister(kind: str, name: str) -> None:
    """Forget a component registered with `geopeft.register`."""
    from .registry import get_registry

    get_registry().unregister(kind, name)


# imported after the interfaces: these modules use them
from .calibration import LayerStats, calibrate  # noqa: E402
from .combine import combine  # noqa: E402
from .data_parallel import resizable_factors  # noqa: E402
from .export import export_peft  # noqa: E402
from .model import adapt, adapters, disable_adapters, merge, unload, unmerge  # noqa: E402
from .named import active_adapters, adapter_names, delete_adapter, set_adapter  # noqa: E402
from .optim import GeometricOptimizer, optimizer  # noqa: E402
from .peft_import import import_peft  # noqa: E402
from .serialization import load, save  # noqa: E402
from .summary import summary  # noqa: E402

__all__ = [
    "Adapter", "CheckpointError", "ConfigError", "GeometricOptimizer", "GeopeftError",
    "GradientTransform", "IncompatibleComponentsError", "Initializer", "Manifold", "PluginError",
    "LayerStats", "Quantization", "RankChange", "RankController", "Recipe", "ShapeError", "TargetError",
    "TargetPreset", "UnknownComponentError", "active_adapters", "adapt", "adapter_names", "adapters",
    "calibrate", "combine", "components", "delete_adapter", "disable_adapters", "export_peft", "hookimpl",
    "import_peft", "load", "merge", "optimizer", "register", "resizable_factors", "save", "set_adapter",
    "summary", "unload", "unmerge", "unregister",
]
