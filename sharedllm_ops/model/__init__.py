"""SharedLLM on stock Hugging Face Llama-family models (docs/DESIGN.md section 5). Needs ``transformers``
(``pip install sharedllm_ops[model]``)."""

from __future__ import annotations

try:
    import transformers  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("sharedllm_ops.model needs transformers: pip install 'sharedllm_ops[model]'") from e

from .config import SharedLLMConfig
from .modeling import CompressedContext, CrossBlock, SharedLLMForCausalLM, check_llama_shaped

__all__ = ["CompressedContext", "CrossBlock", "SharedLLMConfig", "SharedLLMForCausalLM", "check_llama_shaped"]
