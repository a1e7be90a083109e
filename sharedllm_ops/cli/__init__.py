"""The ``sharedllm-ops`` command (also ``python -m sharedllm_ops``), one module per command:

    sharedllm-ops info              info.py       what was compiled, and which backend of each op can run here
    sharedllm-ops demo              demo.py       SharedLLM on SmolLM2-135M and standard-library text: context
                                                  sizes, stage times, memory, the perplexity table, a continuation
    sharedllm-ops eval-ppl --text FILE [--model PATH]
                                    eval_ppl.py   the perplexity table for your own model and texts
    sharedllm-ops train             train.py      train the cross blocks (continual pre-training)
    sharedllm-ops ops [--quick]     ops.py        the kernel check: every op on every backend available on the
                                                  device, error against the reference and median time
                                                  (``--quick``: tiny shapes, seconds)

``parser.py`` builds the parser and holds :func:`main`. The kernel check is ``kernel_cases.py`` (what
runs) and ``kernel_check.py`` (running and timing it); the model commands run
``sharedllm_ops.model.demo``, imported only when one of them runs (``model_options.py``).
"""

from __future__ import annotations

import warnings

from .. import dtypes as _dtypes
from . import kernel_cases as _kernel_cases
from . import kernel_check as _kernel_check
from .parser import main

# Names of the one-module ``sharedllm_ops.cli`` of 0.1 that outside code may use, now elsewhere or
# renamed: old name -> (the name to use now, the object).
_MOVED = {
    "DTYPES": ("sharedllm_ops.dtypes.DTYPES", _dtypes.DTYPES),
    "TOLERANCE": ("sharedllm_ops.cli.kernel_check.TOLERANCE", _kernel_check.TOLERANCE),
    "run_demo": ("sharedllm_ops.cli.kernel_check.run_kernel_check", _kernel_check.run_kernel_check),
    "DemoResult": ("sharedllm_ops.cli.kernel_check.CheckResult", _kernel_check.CheckResult),
    "time_call": ("sharedllm_ops.cli.kernel_check.time_call", _kernel_check.time_call),
    "DemoShapes": ("sharedllm_ops.cli.kernel_cases.CheckShapes", _kernel_cases.CheckShapes),
    "DemoCase": ("sharedllm_ops.cli.kernel_cases.CheckCase", _kernel_cases.CheckCase),
    "demo_cases": ("sharedllm_ops.cli.kernel_cases.check_cases", _kernel_cases.check_cases),
    "FULL_SHAPES": ("sharedllm_ops.cli.kernel_cases.FULL_SHAPES", _kernel_cases.FULL_SHAPES),
    "QUICK_SHAPES": ("sharedllm_ops.cli.kernel_cases.QUICK_SHAPES", _kernel_cases.QUICK_SHAPES),
}


def __getattr__(name: str):
    if name in _MOVED:
        new_name, value = _MOVED[name]
        warnings.warn(f"sharedllm_ops.cli.{name} is deprecated: use {new_name}", DeprecationWarning, stacklevel=2)
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["main"]
