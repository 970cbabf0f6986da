"""The Triton kernels against their torch references, in Triton's CPU interpreter.

The cases live in `kernels_triton_cases.py`; they run here in one subprocess with
TRITON_INTERPRET=1 and GEOPEFT_KERNELS=triton, because Triton reads TRITON_INTERPRET when
triton is first imported — set in this process, it would leak into every later test."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

CASES = Path(__file__).with_name("kernels_triton_cases.py")


def test_triton_kernels_match_torch_references_in_the_interpreter():
    import triton  # noqa: F401 - a dev dependency: fail loudly if it is missing
    env = {**os.environ, "TRITON_INTERPRET": "1", "GEOPEFT_KERNELS": "triton",
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", str(CASES), "-q", "-p", "no:cacheprovider",
                           "-p", "no:xdist", "-W", "error::UserWarning"],
                          env=env, capture_output=True, text=True, timeout=300)
    tail = (proc.stdout[-6000:] + proc.stderr[-3000:])
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout and "skipped" not in proc.stdout and "deselected" not in proc.stdout, tail
