"""Which implementation of a kernel runs: the torch reference or its Triton kernel.

`GEOPEFT_KERNELS` (read at each call):
- unset or "auto": Triton for CUDA tensors, for the ops in `FASTER_ON_CUDA` (those the
  GPU benchmark, `benchmarks/kernels.py --device cuda`, measured faster than torch),
  when triton imports; torch otherwise;
- "torch": always the torch reference;
- "triton": the Triton kernel wherever it takes the shape, on CUDA — or on the CPU
  through Triton's interpreter when `TRITON_INTERPRET=1` (how the tests run them).

triton is imported only when a Triton kernel is chosen, never by `import geopeft`.
`geopeft env` prints `report()`.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

import torch
from torch import Tensor

from geopeft.errors import ConfigError

ENV = "GEOPEFT_KERNELS"
MODES = ("auto", "torch", "triton")

#: op → whether its Triton kernel beat the torch reference on a GPU in
#: `benchmarks/kernels.py --device cuda` (docs/benchmarks.md). No GPU run is recorded
#: yet, so "auto" keeps every op on torch; "triton" forces the kernels.
FASTER_ON_CUDA: dict[str, bool] = {
    "pair_grams": False,
    "two_products": False,
    "lora_shrink": False,
    "lora_expand": False,
}

_TRITON: dict[str, Any] = {}


def mode() -> str:
    """The kernel mode from `GEOPEFT_KERNELS` ("auto" when unset)."""
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ConfigError(f"{ENV}={value!r} is not a kernel mode; use one of {', '.join(MODES)} "
                          f"(or unset it for 'auto')")
    return value


def interpreting() -> bool:
    """Whether Triton kernels would run in Triton's CPU interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_status() -> tuple[bool, str]:
    """(importable, version or the import error), imported once."""
    if "status" not in _TRITON:
        try:
            import triton
            _TRITON["status"] = (True, triton.__version__)
        except Exception as exc:  # noqa: BLE001 - any failure means: no Triton here
            _TRITON["status"] = (False, f"{type(exc).__name__}: {exc}")
    return _TRITON["status"]


def use_triton(op: str, *tensors: Tensor, supported: bool = True) -> bool:
    """Whether `op` on `tensors` runs its Triton kernel (see the module docstring).
    A shape or dtype the kernel does not take (`supported=False`) always runs torch."""
    chosen = mode()
    if chosen == "torch" or not supported:
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if chosen == "auto":
        return on_cuda and FASTER_ON_CUDA.get(op, False) and triton_status()[0]
    if not (on_cuda or interpreting()):
        raise ConfigError(f"{ENV}=triton, but {op} got tensors on {tensors[0].device}: Triton kernels "
                          f"run on CUDA (or on the CPU in Triton's interpreter, TRITON_INTERPRET=1); "
                          f"unset {ENV} to use the torch kernels here")
    ok, why = triton_status()
    if not ok:
        raise ConfigError(f"{ENV}=triton, but triton does not import ({why}): install triton "
                          f"(it ships with torch on Linux) or unset {ENV}")
    return True


def triton_module(name: str):
    """`geopeft.kernels.triton.<name>`, imported on first use."""
    return importlib.import_module(f"geopeft.kernels.triton.{name}")


def report() -> dict[str, Any]:
    """The active kernel paths: mode, triton, CUDA, and per op the path on CUDA and on CPU."""
    try:
        chosen, error = mode(), None
    except ConfigError as exc:
        chosen, error = None, str(exc)
    ok, triton = triton_status()
    cuda = torch.cuda.is_available()

    def path(op: str, device: str) -> str:
        if chosen == "torch" or chosen is None:
            return "torch"
        if chosen == "triton":
            return "triton" if ok and (device == "cuda" or interpreting()) else "error"
        return "triton" if device == "cuda" and ok and FASTER_ON_CUDA[op] else "torch"

    return {"mode": chosen, "mode_error": error, "triton": triton if ok else None,
            "triton_error": None if ok else triton, "triton_interpret": interpreting(),
            "cuda": cuda, "cuda_device": torch.cuda.get_device_name() if cuda else None,
            "ops": {op: {"cuda": path(op, "cuda"), "cpu": path(op, "cpu")} for op in FASTER_ON_CUDA}}
