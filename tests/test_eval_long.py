"""``sharedllm-ops eval-long`` (``sharedllm_ops.model.long_context``, ``passkey``, ``long_report``,
``long_eval``) on a tiny random Llama: the perplexity sweep's rows and bookkeeping, the passkey
prompt and scorer, the report files, and clear errors for bad arguments. Each test takes seconds;
the one on the embedded SmolLM2 checks that full attention does answer the passkey prompt."""

import importlib.util
import json

import pytest
import torch
from conftest import requires_smollm2

pytest.importorskip("transformers")

from sharedllm_ops.cli import main  # noqa: E402
from sharedllm_ops.model import SharedLLMConfig, SharedLLMForCausalLM  # noqa: E402
from sharedllm_ops.model import long_context as LC  # noqa: E402
from sharedllm_ops.model import passkey as PK  # noqa: E402
from sharedllm_ops.model.evaluate import TRAINING_FREE_ROW  # noqa: E402
from sharedllm_ops.model.pretrained import tiny_model  # noqa: E402
from sharedllm_ops.model.text import full_perplexity  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB = 260  # the byte tokenizers' ids (0..256) fit
POSITIONS = 256  # the tiny model's max_position_embeddings: full attention stops there
# the paper's path at a tiny scale: 2 injected layers, chunks of 32, tree depth 2, 4 rows per node
COMPRESSED = SharedLLMConfig(num_injected_layers=2, chunk_size=32, tree_depth=2, tokens_per_node=4,
                             injection="merge", positions="true")
# training-free, uncompressed, every layer, one chunk: exactly full attention (docs/DESIGN.md section 5)
EXACT = SharedLLMConfig(num_injected_layers=4, chunk_size=1024, tree_depth=0, tokens_per_node=None,
                        injection="merge", positions="true")


def base_model():
    return tiny_model(vocab_size=VOCAB, max_position_embeddings=POSITIONS)


def text_ids(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


class ByteTokenizer:
    """One id per UTF-8 byte (1..256); 0 ends a sequence."""

    eos_token_id = pad_token_id = 0

    def __call__(self, text, add_special_tokens=False, verbose=False):
        return {"input_ids": [b + 1 for b in text.encode("utf-8")]}

    def decode(self, ids, skip_special_tokens=False):
        return bytes(int(i) - 1 for i in ids if int(i) > 0).decode("utf-8", errors="replace")


# ----------------------------------------------------------------------------------------------
# perplexity against context length


def test_sweep_rows_bookkeeping_and_where_full_attention_fits():
    plan = LC.SweepPlan((0, 64, 128, 232), (32,), last=8)
    ids = text_ids(plan.total_tokens + 40)  # tokens past T are never read
    base = base_model()
    labels = []
    rows = LC.context_sweep(base, ids, plan, {"compressed": COMPRESSED}, progress=labels.append)
    assert len(labels) == LC.sweep_steps(plan, 1, POSITIONS)
    assert [(r.kind, r.window) for r in rows] == [("window", 32), ("sharedllm", 32), ("same_kv", 32), ("full", 32)]
    alone, shared, same_kv, full = rows

    T = plan.total_tokens
    for c in plan.contexts:  # the scored tokens are one slice, whatever the context
        context, decoder = plan.split(ids, 32, c)
        assert torch.equal(torch.cat([context, decoder]), ids[T - 32 - c:T])
        assert torch.equal(decoder[-plan.last:], ids[plan.scored]) and plan.scored == slice(T - 8, T)

    assert all(p == alone.perplexity[0] for p in alone.perplexity)
    assert [row.perplexity[0] for row in rows] == [alone.perplexity[0]] * 4  # C = 0: the window alone
    contexts = [s["context_tokens"] for s in shared.stats[1:]]
    compressed = [s["compressed_tokens"] for s in shared.stats[1:]]
    assert contexts == [64, 128, 232] and compressed == sorted(compressed) and 0 < compressed[0] < 64
    assert shared.kv_tokens[1:] == [32 + r for r in compressed]
    assert same_kv.kv_tokens == [32] + [min(32 + r, 32 + c) for r, c in zip(compressed, plan.contexts[1:])]
    # the same-KV window is the plain window of that many tokens ending at T
    kv = same_kv.kv_tokens[2]
    assert same_kv.perplexity[2] == pytest.approx(full_perplexity(base, ids[T - kv:T], 8), rel=1e-6)
    # full attention where C + W fits the 256 positions: not at C = 232
    assert [p is None for p in full.perplexity] == [False, False, False, True]
    assert full.kv_tokens[:3] == [32, 96, 160]


def test_uncompressed_single_chunk_sharedllm_equals_full_attention():
    """The exact training-free path sees the same tokens as full attention: the context slice sits right
    before the window and the scored tokens are the same."""
    plan = LC.SweepPlan((0, 48, 96), (40,), last=16)
    rows = LC.context_sweep(base_model(), text_ids(plan.total_tokens), plan, {"exact": EXACT})
    shared = next(r for r in rows if r.kind == "sharedllm")
    full = next(r for r in rows if r.kind == "full")
    alone = next(r for r in rows if r.kind == "window")
    assert shared.perplexity == pytest.approx(full.perplexity, rel=1e-4)
    assert full.perplexity[2] != pytest.approx(alone.perplexity[2], rel=1e-3)  # the context does matter


def test_retrieval_query_ends_before_the_scored_tokens():
    base = base_model()
    context, decoder = text_ids(100, seed=2), text_ids(40, seed=3)
    seen = []
    with LC.wrapped(base, COMPRESSED) as model:
        compress = model.compress_context
        model.compress_context = lambda *a, **kw: seen.append(kw["query_input_ids"]) or compress(*a, **kw)
        LC.sharedllm_window_perplexity(model, context, decoder, last=16)
    assert torch.equal(seen[0], decoder[None, :24])
    assert not getattr(base, "_sharedllm_wrapped", False)  # unwrapped on exit


@pytest.mark.parametrize("contexts, windows, last, message", [
    ((0, 8192, 4096), (512,), 256, "strictly increasing"),
    ((0, 0), (512,), 256, "strictly increasing"),
    ((-1, 8192), (512,), 256, ">= 0"),
    ((), (512,), 256, ">= 0"),
    ((0, 8192), (256,), 256, "--last"),
    ((0, 8192), (512, 128), 256, "--last"),
    ((0, 8192), (512, 512), 256, "distinct"),
])
def test_bad_sweep_plans_raise(contexts, windows, last, message):
    with pytest.raises(ValueError, match=message):
        LC.SweepPlan(contexts, windows, last)


def test_a_text_shorter_than_the_plan_is_refused():
    plan = LC.SweepPlan((0, 100), (32,), last=8)
    with pytest.raises(ValueError, match="the text has 131 tokens.*need 132"):
        LC.context_sweep(base_model(), text_ids(131), plan, {})


# ----------------------------------------------------------------------------------------------
# passkey


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_passkey_prompt_puts_the_key_at_its_depth_inside_the_context(depth):
    tok = ByteTokenizer()
    prompt = PK.build_passkey_prompt(tok, 700, 64, depth, "48213")
    intro, sentence = len(tok(PK.INTRO)["input_ids"]), len(tok(PK.KEY_SENTENCE.format(key="48213"))["input_ids"])
    assert prompt.ids.numel() == 700 and prompt.context_tokens == 700 - 64
    assert tok.decode(prompt.ids[:intro]) == PK.INTRO
    found = tok.decode(prompt.ids[prompt.key_start:prompt.key_start + prompt.key_tokens])
    assert found == PK.KEY_SENTENCE.format(key="48213") and prompt.key_tokens == sentence
    room = prompt.context_tokens - intro - sentence
    assert prompt.key_start - intro == round(depth * room)
    assert prompt.key_start + prompt.key_tokens <= prompt.context_tokens  # in the context, even at depth 1
    window = tok.decode(prompt.window)
    assert window.endswith(PK.QUESTION) and "48213" not in window
    assert tok.decode(prompt.ids).count("48213") == 2


def test_depth_one_ends_the_key_on_the_last_context_token():
    prompt = PK.build_passkey_prompt(ByteTokenizer(), 500, 64, 1.0, "10000")
    assert prompt.key_start + prompt.key_tokens == prompt.context_tokens


@pytest.mark.parametrize("continuation", [" 48213", "48213.", " 48213 is the pass key", "\n48213\n"])
def test_scorer_accepts_the_key(continuation):
    assert PK.score_passkey(continuation, "48213")


@pytest.mark.parametrize("continuation", [
    " 48312",  # other digits
    " 4821",  # 4 digits
    " 482135",  # one digit too many
    " 48 213",  # digits split by a space
    " 482-13",  # split by other text
    " a key that is used to create a pass.",  # no digits
    "",
    " 12345, no: 48213",  # the first number counts
])
def test_scorer_marks_wrong_answers_wrong(continuation):
    assert not PK.score_passkey(continuation, "48213")


def test_passkeys_are_seeded_five_digit_numbers():
    keys = [PK.passkey_key(0, 4096, 0.5, i) for i in range(20)]
    assert keys == [PK.passkey_key(0, 4096, 0.5, i) for i in range(20)]
    assert all(len(k) == 5 and k.isdigit() for k in keys) and len(set(keys)) > 15
    assert PK.passkey_key(1, 4096, 0.5, 0) != PK.passkey_key(0, 4096, 0.5, 0)


@pytest.mark.parametrize("length, window, depth, message", [
    (200, 64, 0.5, "--lengths 200 is too short"),
    (700, 30, 0.5, "cannot hold the question"),
    (700, 64, 1.5, r"--depths must lie in \[0, 1\]"),
])
def test_bad_passkey_prompts_raise(length, window, depth, message):
    with pytest.raises(ValueError, match=message):
        PK.build_passkey_prompt(ByteTokenizer(), length, window, depth, "12345")


def test_a_length_too_short_for_a_larger_window_is_skipped_there_and_for_all_windows_refused():
    tok = ByteTokenizer()
    items = PK.passkey_items(tok, [48, 200], [240, 400], [0.0, 1.0])
    assert [(it.window, it.length) for it in items if it.prompt is None] == [(200, 240)] * 2
    results = PK.passkey_grid(base_model(), tok, {}, [it for it in items if it.length == 240])
    skipped = [r for r in results if r.window == 200]
    assert len(skipped) == 2 * 2 and all(r.answer is None and r.correct is None for r in skipped)
    with pytest.raises(PK.PromptTooShort, match="--lengths 200 is too short for --window 48"):
        PK.passkey_items(tok, [48, 200], [200, 400], [0.5])
    with pytest.raises(ValueError, match="--keys"):
        PK.passkey_items(tok, [48], [400], [0.5], keys=0)


def test_passkey_grid_routes_the_prompt_to_each_method(monkeypatch):
    """A stand-in generate answers the first 5-digit number it is given: full attention sees the key,
    the window alone never does; every answer is scored; full attention stops at 256 positions."""
    base, tok = base_model(), ByteTokenizer()

    def answer_what_you_see(input_ids, max_new_tokens, **kwargs):
        import re

        seen = re.search(r"\d{5}", tok.decode(input_ids[0]))
        reply = tok(" " + (seen.group(0) if seen else "no idea"))["input_ids"][:max_new_tokens]
        return torch.cat([input_ids, torch.tensor([reply])], dim=1)

    monkeypatch.setattr(base, "generate", answer_what_you_see)
    labels = []
    items = PK.passkey_items(tok, [48], [240, 300], [0.0, 1.0], keys=2)
    results = PK.passkey_grid(base, tok, {}, items, progress=labels.append)
    assert len(labels) == PK.passkey_steps(items, 0, POSITIONS)
    full = [r for r in results if r.method == PK.FULL_ATTENTION]
    alone = [r for r in results if r.method == "window 48 alone"]
    assert len(full) == len(alone) == 8
    assert all(r.correct for r in full if r.length == 240)
    assert all(r.answer is None and r.correct is None for r in full if r.length == 300)
    assert all(r.correct is False and r.answer.strip() == "no idea" for r in alone)


def test_passkey_grid_on_a_tiny_model_with_sharedllm():
    tok = ByteTokenizer()
    results = PK.passkey_grid(base_model(), tok, {"compressed": COMPRESSED}, PK.passkey_items(tok, [48], [240], [0.5]))
    assert [r.method for r in results] == [PK.FULL_ATTENTION, "window 48 alone", "compressed"]
    assert all(isinstance(r.answer, str) and r.correct == PK.score_passkey(r.answer, r.key) for r in results)


# ----------------------------------------------------------------------------------------------
# the command


@pytest.fixture(scope="module")
def tiny_model_folder(tmp_path_factory):
    """A tiny random Llama saved with a byte-level Hugging Face tokenizer: loads like any model folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<eos>"] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    folder = tmp_path_factory.mktemp("tiny-model")
    base_model().save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>").save_pretrained(folder)
    injector = folder.parent / "tiny-injector"
    residual = SharedLLMConfig(num_injected_layers=2, chunk_size=32, tree_depth=2, tokens_per_node=4)
    SharedLLMForCausalLM.from_base(base_model(), residual).save_pretrained(injector)
    return folder, injector


SMALL_RUN = ["--window", "48", "--last", "8", "--contexts", "0", "64", "224", "--lengths", "240", "300",
             "--depths", "0", "1", "--chunk-size", "32"]


def test_cli_writes_tables_json_and_plots(tiny_model_folder, tmp_path, capsys):
    folder, injector = tiny_model_folder
    text = tmp_path / "text.py"
    text.write_text(importlib.util.find_spec("json.decoder").loader.get_source("json.decoder"))
    out = tmp_path / "out"
    assert main(["eval-long", "--model", str(folder), "--text", str(text), "--injector", "none", str(injector),
                 "--output", str(out), *SMALL_RUN]) == 0
    printed = capsys.readouterr().out
    assert "| window 48 alone |" in printed and "| full attention |" in printed and "—" in printed
    assert (out / "results.md").read_text().strip() in printed
    data = json.loads((out / "results.json").read_text())
    assert data["settings"]["total_tokens"] == 224 + 48 and data["settings"]["contexts"] == [0, 64, 224]
    names = [r["name"] for r in data["perplexity"]["rows"]]
    assert f"SharedLLM (injector {injector})" in names and TRAINING_FREE_ROW in names
    assert len(names) == 1 + 2 * 2 + 1  # window, two (SharedLLM, same KV) pairs, full attention
    full = next(r for r in data["perplexity"]["rows"] if r["kind"] == "full")
    # 64 + 48 tokens fit the 256 positions, 224 + 48 do not
    assert full["perplexity"][2] is None and full["perplexity"][1] is not None
    assert len(data["passkey"]["results"]) == 2 * 2 * (1 + 1 + 2)  # lengths x depths x methods
    assert data["passkey"]["accuracy"][f"{PK.FULL_ATTENTION} | window 48"][1] == [None, None]  # 300 > 256
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "perplexity_vs_context.png").stat().st_size > 1000 and (out / "passkey.png").is_file()
    else:
        assert "pip install 'sharedllm_ops[plot]'" in printed


@pytest.mark.parametrize("options, message", [
    (["--contexts", "0", "8192", "4096"], "strictly increasing"),
    (["--contexts", "-8", "0"], ">= 0"),
    (["--window", "64", "--last", "64"], "--last"),
    (["--depths", "0", "1.5"], r"--depths must lie in \[0, 1\]"),
    (["--keys", "0"], "--keys"),
    (["--chunk-size", "16"], "--chunk-size"),
    (["--text", "/nonexistent/book.txt"], "--text: no such file"),
    (["--config", "{bad"], "--config is not JSON"),
    (["--config", "[1]"], "--config must be a JSON object"),
])
def test_cli_rejects_bad_arguments_before_loading_a_model(options, message):
    with pytest.raises(SystemExit, match=message):
        main(["eval-long", "--model", "/nonexistent", *options])


@pytest.mark.parametrize("options, message", [
    (["--lengths", "100"], "--lengths 100 is too short"),
    (["--window", "512"], "--window 512 exceeds the base model's max_position_embeddings 256"),
    (["--contexts", "0", "100000", "--tasks", "perplexity"], "the text has .* tokens"),
    (["--module", "no_such_module.py"], "--module: no standard-library module"),
    (["--config", '{"no_such_field": 1}'], "--config .*no_such_field"),
    (["--config", '{"anchor_tokens": -1}'], "--config .*anchor_tokens"),
])
def test_cli_rejects_what_the_model_or_text_cannot_do(tiny_model_folder, tmp_path, options, message):
    folder, _ = tiny_model_folder
    with pytest.raises(SystemExit, match=message):
        main(["eval-long", "--model", str(folder), "--injector", "none", "--module", "json/decoder.py",
              "--chunk-size", "32", "--window", "64", "--last", "8", "--output", str(tmp_path), *options])


@requires_smollm2
def test_smollm2_with_full_attention_answers_the_passkey_and_the_window_alone_cannot():
    from sharedllm_ops.model.pretrained import load_base_model

    base, tokenizer = load_base_model()
    results = PK.passkey_grid(base, tokenizer, {}, PK.passkey_items(tokenizer, [64], [400], [0.0, 1.0]))
    full = [r for r in results if r.method == PK.FULL_ATTENTION]
    alone = [r for r in results if r.method != PK.FULL_ATTENTION]
    assert all(r.correct for r in full), [(r.key, r.answer) for r in full]
    assert not any(r.correct for r in alone), [(r.key, r.answer) for r in alone]


def test_config_overrides_only_the_named_fields_of_the_training_free_row():
    from types import SimpleNamespace

    from sharedllm_ops.model.long_eval import injector_configs

    base = SimpleNamespace(model=SimpleNamespace(layers=[None] * 3))
    args = SimpleNamespace(injector=["none"], model="folder", chunk_size=64, config=None)
    (plain_name, plain), = injector_configs(args, base).items()
    args.config = ['{"anchor_tokens": 8, "lead_tokens": 0, "retrieval_node_embedding": "last"}', '{"tree_depth": 2}']
    (name, config), (_, shallower) = injector_configs(args, base).items()
    assert plain_name == TRAINING_FREE_ROW and name == f"{TRAINING_FREE_ROW}, {args.config[0]}"
    assert shallower.tree_depth == 2 and plain.tree_depth == 5
    assert (config.anchor_tokens, config.lead_tokens, config.retrieval_node_embedding) == (8, 0, "last")
    assert (plain.anchor_tokens, plain.lead_tokens, plain.retrieval_node_embedding) == (16, 64, "mean")
    changed = {f for f in config.to_dict() if config.to_dict()[f] != plain.to_dict()[f]}
    assert changed == {"anchor_tokens", "lead_tokens", "retrieval_node_embedding"}


def test_config_overrides_a_trained_injector_row_and_keeps_its_weights(tiny_model_folder, tmp_path):
    from types import SimpleNamespace

    from sharedllm_ops.model.long_context import wrapped
    from sharedllm_ops.model.long_eval import injector_configs
    from sharedllm_ops.model.pretrained import load_base_model

    folder, injector = tiny_model_folder
    base, _ = load_base_model(str(folder))
    trained = SharedLLMForCausalLM.from_pretrained(str(injector), base)
    with torch.no_grad():  # weights a fresh copy-initialised injector would not have
        for name, p in trained.named_parameters():
            if "cross" in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    saved = {k: v.clone() for k, v in trained.state_dict().items() if "cross" in k}
    trained.save_pretrained(tmp_path / "trained")
    trained.unwrap()
    args = SimpleNamespace(injector=[str(tmp_path / "trained")], model=str(folder), chunk_size=64,
                           config=['{"tree_depth": 1, "row_weight_exponent": -1}', "{}"])
    (name, row), (_, plain) = injector_configs(args, base).items()
    assert name == f"SharedLLM (injector {tmp_path / 'trained'}), {args.config[0]}"
    assert plain == (str(tmp_path / "trained"), {})
    with wrapped(base, row) as model:
        assert (model.config.tree_depth, model.config.row_weight_exponent) == (1, -1)
        # the rest is the injector's own config, not the training-free one
        assert (model.config.injection, model.config.chunk_size, model.config.tokens_per_node) == ("residual", 32, 4)
        state = model.state_dict()
        assert saved and all(torch.equal(state[k], v) for k, v in saved.items())
    args.config = ['{"no_such_field": 1}']
    with pytest.raises(SystemExit, match="--config .*no_such_field"):
        injector_configs(args, base)


def test_config_overrides_the_shipped_injector_row():
    from types import SimpleNamespace

    from sharedllm_ops.model.long_eval import _described, injector_configs
    from sharedllm_ops.model.pretrained import shipped_injector

    if shipped_injector() is None:
        pytest.skip("this installation ships no injector")
    base = SimpleNamespace(model=SimpleNamespace(layers=[None] * 30))
    args = SimpleNamespace(injector=["shipped"], model=None, chunk_size=1024, config=['{"lead_tokens": 8, "drop_node_sinks": false}'])
    ((name, row),) = injector_configs(args, base).items()
    assert name == f"SharedLLM (shipped injector), {args.config[0]}"
    assert row == (str(shipped_injector()), {"lead_tokens": 8, "drop_node_sinks": False})
    assert _described(row) == {"injector": str(shipped_injector()), "overrides": row[1]}


def test_validate_config_overrides_the_training_free_and_the_trained_config(tiny_model_folder, tmp_path):
    folder, injector = tiny_model_folder
    common = ["validate", "--model", str(folder), "--modules", "json/decoder.py", "--window", "48", "--last", "8",
              "--max-tokens", "200", "--skip-full"]
    out = tmp_path / "free.json"
    assert main([*common, "--injector", "none", "--config", '{"chunk_size": 32, "anchor_tokens": 4, "drop_node_sinks": false}',
                 "--json", str(out)]) == 0
    config = json.loads(out.read_text())["config"]
    assert (config["injection"], config["chunk_size"], config["anchor_tokens"]) == ("merge", 32, 4)
    out = tmp_path / "trained.json"
    assert main([*common, "--injector", str(injector), "--config", '{"tree_depth": 1}', "--json", str(out)]) == 0
    config = json.loads(out.read_text())["config"]
    assert (config["injection"], config["tree_depth"], config["tokens_per_node"]) == ("residual", 1, 4)
    with pytest.raises(SystemExit, match="--config .*no_such_field"):
        main([*common, "--injector", "none", "--config", '{"no_such_field": 1}'])
