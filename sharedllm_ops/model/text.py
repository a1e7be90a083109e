"""Real text present on every machine (the Python standard library) and baseline perplexities.

Training text is the ``.py`` files of a few stdlib packages (``TRAIN_PACKAGES``); evaluation
text is a disjoint set of long top-level stdlib modules (``EVAL_MODULES``), each longer than
8192 SmolLM2 tokens on Python 3.10 to 3.13. docs/DESIGN.md section 7 scores the last 256 of the first
8192 tokens of a module::

    ids = tokenize_text(tokenizer, module_text("inspect.py"), max_tokens=8192)
    window_perplexity(model, ids, window=512, last=256)   # "window 512 only"
    full_perplexity(model, ids, last=256)                 # "full attention"
"""

from __future__ import annotations

import hashlib
import math
import sys
import sysconfig
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = [
    "EVAL_MODULES",
    "SELECTION_MODULES",
    "TRAIN_PACKAGES",
    "full_perplexity",
    "module_text",
    "site_packages_files",
    "stdlib_dir",
    "tokenize_text",
    "training_files",
    "window_perplexity",
]

TRAIN_PACKAGES = (
    "json", "email", "asyncio", "concurrent", "importlib",
    "http", "xml", "unittest", "logging", "multiprocessing",
)

# Single-file modules on every Python from 3.10 to 3.13, each well over 8192 SmolLM2 tokens
# (functools, the shortest, has about 9K). Avoided: modules that became packages (zipfile in
# 3.12, pathlib in 3.13), that shrank to a shim (datetime in 3.12) or that were removed (cgi,
# aifc, nntplib in 3.13).
EVAL_MODULES = (
    "inspect.py",
    "dataclasses.py",
    "functools.py",
    "argparse.py",
    "typing.py",
    "subprocess.py",
    "tarfile.py",
    "difflib.py",
    "pydoc.py",
    "doctest.py",
)

# Further validation modules, used with EVAL_MODULES to choose between training runs (none is
# trained on): threading.py ... ssl.py (zipfile is a package from 3.12: its __init__.py).
SELECTION_MODULES = (
    "threading.py",
    "pickle.py",
    "shutil.py",
    "zipfile",
    "configparser.py",
    "ast.py",
    "enum.py",
    "ssl.py",
)

# Folder names that hold a package's own tests (e.g. unittest/test on Python <= 3.11).
_TEST_DIRS = frozenset({"test", "tests", "idle_test"})


def stdlib_dir() -> Path:
    """The folder of the Python standard library's source (``sysconfig``'s ``stdlib`` path)."""
    return Path(sysconfig.get_paths()["stdlib"])


def _module_path(name: str) -> Path:
    """``"inspect.py"``, ``"inspect"``, ``"json.decoder"``, ``"json/decoder.py"`` or a package
    name (its ``__init__.py``) to a file under ``stdlib_dir()``."""
    stem = name[:-3] if name.endswith(".py") else name
    parts = stem.replace("/", ".").split(".")
    root = stdlib_dir()
    if all(parts):
        for candidate in (root.joinpath(*parts[:-1], parts[-1] + ".py"), root.joinpath(*parts, "__init__.py")):
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(f"no standard-library module {name!r} under {root}")


def module_text(name: str) -> str:
    """The source text of standard-library module ``name`` (e.g. ``"inspect.py"``)."""
    return _module_path(name).read_text(encoding="utf-8")


def training_files() -> list[Path]:
    """All ``.py`` files of ``TRAIN_PACKAGES`` (their test folders excluded), sorted."""
    root = stdlib_dir()
    files = []
    for pkg in TRAIN_PACKAGES:
        for path in (root / pkg).rglob("*.py"):
            if _TEST_DIRS.isdisjoint(path.relative_to(root).parts[:-1]):
                files.append(path)
    return sorted(files)


# Third-party folders that hold copies or backports of standard-library code: the evaluation domain.
_STDLIB_COPIES = frozenset({"_distutils", "distutils", "_vendor", "vendor", "vendored", "backports",
                            "importlib_metadata", "importlib_resources", "typing_extensions.py"})


def site_packages_files(max_bytes: int | None = None) -> list[Path]:
    """``.py`` files of the installed third-party packages (this environment's ``purelib`` and
    ``platlib``), sorted: a second, larger and more varied training source than ``TRAIN_PACKAGES``.

    Left out so that no standard-library text leaks into training: test folders, vendored or
    backported standard-library code (``_STDLIB_COPIES``) and any file named like a top-level
    standard-library module. With ``max_bytes``, a sample of files up to that many bytes, drawn by
    a hash of each file's path (the same on every machine with the same packages)."""
    roots = sorted({Path(sysconfig.get_paths()[k]) for k in ("purelib", "platlib")})
    stdlib_names = set(sys.stdlib_module_names)
    files = []
    for root in roots:
        if not root.is_dir() or root == stdlib_dir():
            continue
        for path in root.rglob("*.py"):
            parts = path.relative_to(root).parts
            if path.stem in stdlib_names or not _TEST_DIRS.isdisjoint(parts[:-1]) or not _STDLIB_COPIES.isdisjoint(parts):
                continue
            files.append((hashlib.sha1("/".join(parts).encode()).hexdigest(), path))
    if max_bytes is not None:
        files.sort()
        chosen, total = [], 0
        for key, path in files:
            if total >= max_bytes:
                break
            size = path.stat().st_size
            if size and total + size <= max_bytes * 1.05:
                chosen.append((key, path))
                total += size
        files = chosen
    return sorted(path for _, path in files)


def tokenize_text(tokenizer, text: str, max_tokens: int | None = None) -> torch.Tensor:
    """Token ids of ``text`` without special tokens (no BOS): a ``LongTensor [N]``, cut to the
    first ``max_tokens`` tokens when given."""
    # verbose=False: long modules exceed model_max_length, which only matters to the caller.
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return torch.tensor(ids, dtype=torch.long)


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def _last_tokens_perplexity(model, ids: torch.Tensor, last: int) -> float:
    """exp(mean NLL) of the last ``last`` tokens of ``ids [N]`` in one causal forward pass.

    Only the ``last`` hidden states that predict them go through ``lm_head`` (``[N, vocab]``
    float32 logits would be 1.6 GB for SmolLM2 at N = 8192); the log-softmax is in float32."""
    if ids.dim() != 1:
        raise ValueError(f"ids must be 1-D [N], got shape {tuple(ids.shape)}")
    n = ids.numel()
    if not 1 <= last < n:
        raise ValueError(f"need 1 <= last < len(ids) (a token before the first scored one), got last={last}, N={n}")
    device = _model_device(model)
    x = ids.to(device)[None]  # [1, N]
    targets = ids[-last:].to(device)  # [last]
    scoring = slice(n - last - 1, n - 1)  # the positions whose next token is a scored one
    base = getattr(model, "model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if base is not None and head is not None:
        hidden = base(input_ids=x, use_cache=False).last_hidden_state  # [1, N, H]
        logits = head(hidden[0, scoring])  # [last, V]
    else:  # a model without the base/head split: slice its full logits
        logits = model(input_ids=x, use_cache=False).logits[0, scoring]
    nll = F.cross_entropy(logits.float(), targets)  # log-softmax in float32 whatever the dtype
    return math.exp(nll.item())


def window_perplexity(model, ids: torch.Tensor, window: int, last: int) -> float:
    """Perplexity of the last ``last`` tokens of ``ids [N]`` when the model sees only the last
    ``window`` tokens: one causal forward over ``ids[-window:]``, scoring its last ``last``
    positions (docs/DESIGN.md section 7, "window 512 only").

    So the scored tokens see between ``window - last`` and ``window - 1`` preceding tokens (a
    single window, not a sliding one per token). With ``window >= N`` this equals
    ``full_perplexity(model, ids, last)``. Needs ``last < min(window, N)``."""
    if window < 1:
        raise ValueError(f"window must be positive, got {window}")
    return _last_tokens_perplexity(model, ids[-window:], last)


def full_perplexity(model, ids: torch.Tensor, last: int) -> float:
    """Perplexity of the last ``last`` tokens of ``ids [N]`` with the whole of ``ids`` as input
    (full causal attention): ``exp`` of their mean next-token cross-entropy."""
    return _last_tokens_perplexity(model, ids, last)
