"""A 2-process FSDP2 (gloo, CPU) training step of a tiny SharedLLM matches the single-process step.

Two worker processes (forked: they reuse this process's imports) each take half of a global batch
of 4, shard the model with ``sharedllm_ops.model.distributed.shard_model`` and run forward, loss,
backward, an AdamW step and a second forward; each writes what it saw to a ``.pt`` file. This
process runs the same step on the whole batch and compares: the loss (mean over the ranks of
each rank's mean token loss, which is the loss whose gradient FSDP's gradient averaging computes),
the whole gradient of every trainable parameter, the parameters after the optimizer step (on both
ranks) and the loss after it; and greedy generation with the sharded model.

The cases include ranks whose contexts make the context path run different numbers of layer
calls (no chunk long enough to split, no context at all) and training the layers that the lower
model shares with the decoder (their gradients come from both uses).
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

from transformers import LlamaConfig, LlamaForCausalLM, StoppingCriteria, StoppingCriteriaList  # noqa: E402

from sharedllm_ops import _ext  # noqa: E402

from conftest import free_port, run_workers  # noqa: E402
from sharedllm_ops.model import SharedLLMForCausalLM  # noqa: E402
from sharedllm_ops.model import distributed  # noqa: E402

WORLD_SIZE = 2
TIMEOUT_S = 120  # the whole 2-process run; it normally takes a few seconds
RTOL = 1e-5  # relative to each tensor's largest magnitude
BACKEND = "cpp" if _ext.loaded else "reference"
EVEN = (100, 37, 64, 9)  # context lengths: every rank has chunks to split (tree retrieval runs on both)
# rank 1 has one context too short to split and one empty: it skips the retrieval passes, or the
# lower model entirely, that rank 0 runs (the FSDP collectives must not depend on that)
RAGGED = (100, 37, 5, 0)
NO_CONTEXT_ON_RANK_1 = (100, 37, 0, 0)

# name -> (model options, set_trainable arguments, context lengths)
CASES = {
    "cross": (dict(), ("cross", 0), EVEN),
    "cross+top1": (dict(), ("cross+top", 1), EVEN),
    "cross+top1-reference": (dict(backend="reference"), ("cross+top", 1), EVEN),
    # every decoder layer trains: layers 0 and 1 also run in the lower model (layer 0 four times per
    # forward, layer 1 stopped inside its attention) and get gradients from every use
    "cross+top4": (dict(), ("cross+top", 4), EVEN),
    "cross+top4-ragged": (dict(), ("cross+top", 4), RAGGED),
    "cross-no-context-on-rank1": (dict(), ("cross", 0), NO_CONTEXT_ON_RANK_1),
    "unshared-lower": (dict(share_lower=False), ("cross", 0), EVEN),  # trains the lower_layers copies
}
GENERATED, PAD = 4, 0
# Adam's first step moves each parameter by about lr * g / (|g| + eps): for gradients near 0 it
# multiplies their (float32 rounding) differences by up to lr / eps. eps = 1e-6 let one element
# of a v_proj differ by 1.3e-5 of the tensor's scale; 1e-4 keeps that well inside RTOL.
ADAMW = dict(lr=1e-3, betas=(0.9, 0.99), eps=1e-4, weight_decay=0.1)


def build_model(options: dict, trainable: tuple) -> SharedLLMForCausalLM:
    torch.manual_seed(1234)
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, intermediate_size=128, attn_implementation="sdpa",
    )
    base = LlamaForCausalLM(config)
    options = dict(dict(num_injected_layers=2, chunk_size=32, tree_depth=3, tokens_per_node=4, backend=BACKEND),
                   **options)
    model = SharedLLMForCausalLM.from_base(base, **options)
    which, top_layers = trainable
    model.set_trainable(which, top_layers=top_layers)
    model.train()
    return model


def make_batch(lengths) -> dict:
    g = torch.Generator().manual_seed(99)
    input_ids = torch.randint(0, 128, (4, 12), generator=g)
    labels = input_ids.clone()
    labels[0, :5] = -100  # the ranks have different numbers of label tokens (17 and 22)
    context = torch.randint(0, 128, (4, 100), generator=g)
    lengths = torch.tensor(lengths)
    context[torch.arange(100)[None, :] >= lengths[:, None]] = 0  # right padding
    return dict(input_ids=input_ids, labels=labels, context_input_ids=context, context_lengths=lengths)


def rank_slice(batch: dict, rank: int) -> dict:
    per_rank = next(iter(batch.values())).shape[0] // WORLD_SIZE
    return {k: v[rank * per_rank:(rank + 1) * per_rank] for k, v in batch.items()}


def token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the label tokens (what the model returns with ``labels``)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


def global_loss(model, batch: dict) -> torch.Tensor:
    """Single process, whole batch: the mean over the ranks' halves of their mean token losses."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits
    halves = [rank_slice(dict(logits=logits, labels=batch["labels"]), r) for r in range(WORLD_SIZE)]
    return torch.stack([token_loss(h["logits"], h["labels"]) for h in halves]).mean()


# ----------------------------------------------------------------------------------------------
# the worker processes


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)  # two workers on the same cores; also the safe setting after fork
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    env = distributed.init_distributed(device="cpu", timeout_s=60)
    assert (env.rank, env.world_size, env.backend) == (rank, WORLD_SIZE, "gloo"), env
    assert distributed.is_main_process() == (rank == 0)
    results = {}
    try:
        for name, (options, trainable, lengths) in CASES.items():
            results[name] = _train_step(rank, options, trainable, lengths)
        results["generate"] = _generate(rank)
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


def _train_step(rank: int, options: dict, trainable: tuple, lengths) -> dict:
    model = build_model(options, trainable)
    distributed.shard_model(model)
    optimizer = torch.optim.AdamW(distributed.trainable_parameters(model), **ADAMW)
    batch = rank_slice(make_batch(lengths), rank)

    out = model(**batch)
    out.loss.backward()
    loss = distributed.all_reduce_mean(out.loss)
    grads = distributed.full_gradients(model)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    params = distributed.full_parameters(model, trainable_only=True)
    with torch.no_grad():
        loss_after = distributed.all_reduce_mean(model(**batch).loss)
    injector = distributed.full_injector_state_dict(model)
    result = dict(loss=loss, loss_after=loss_after, params=params, injector=injector)
    if rank == 0:
        result["grads"] = grads
    return result


def _generate(rank: int) -> torch.Tensor:
    model = build_model(*CASES["cross"][:2])
    distributed.shard_model(model)
    model.eval()
    return model.generate(**generate_inputs(rank_slice(make_batch(RAGGED), rank)))


class StopRows(StoppingCriteria):
    """Stops the given rows after their first generated token."""

    def __init__(self, rows: torch.Tensor):
        self.rows = rows

    def __call__(self, input_ids, scores, **kwargs):
        return self.rows.clone()


def generate_inputs(batch: dict) -> dict:
    """Greedy generation; the rows with short contexts (all of rank 1's) stop after one token."""
    prompt = batch["input_ids"][:, :5]
    stop = StoppingCriteriaList([StopRows(batch["context_lengths"] < 10)])
    return dict(input_ids=prompt, attention_mask=torch.ones_like(prompt), context_input_ids=batch["context_input_ids"],
                context_lengths=batch["context_lengths"], max_new_tokens=GENERATED, do_sample=False,
                pad_token_id=PAD, stopping_criteria=stop)


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory):
    """Runs every case in 2 processes once; returns the ranks' results and the wall time."""
    out_dir = tmp_path_factory.mktemp("fsdp")
    elapsed = run_workers(_worker, (free_port(), str(out_dir)), WORLD_SIZE, TIMEOUT_S,
                          f"the {WORLD_SIZE}-process FSDP run")
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    results = [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD_SIZE)]
    print(f"\n{WORLD_SIZE}-process FSDP run ({method}) of {len(CASES)} cases: {elapsed:.1f} s")
    return results, elapsed


# ----------------------------------------------------------------------------------------------
# the comparisons


def max_rel_diff(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max |actual - expected|`` over ``max |expected|`` (0 for two zero tensors)."""
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = expected.abs().max().item()
    diff = (actual.double() - expected.double()).abs().max().item()
    return diff / scale if scale > 0 else diff


def assert_all_close(actual: dict, expected: dict, what: str) -> float:
    assert sorted(actual) == sorted(expected), f"{what}: names differ: {sorted(set(actual) ^ set(expected))}"
    worst = 0.0
    for name, e in expected.items():
        a = actual[name]
        # a trainable parameter that gets no gradient (None) must get none in both runs
        assert (a is None) == (e is None), f"{what} {name}: {'no' if a is None else 'a'} FSDP gradient, " \
            f"{'no' if e is None else 'a'} single-process one"
        if e is None:
            continue
        d = max_rel_diff(a, e)
        assert d <= RTOL, f"{what} {name}: max relative difference {d:.3g} > {RTOL}"
        worst = max(worst, d)
    return worst


def reference_step(options: dict, trainable: tuple, lengths) -> dict:
    model = build_model(options, trainable)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], **ADAMW)
    batch = make_batch(lengths)
    loss = global_loss(model, batch)
    loss.backward()
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer.step()
    params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        loss_after = global_loss(model, batch)
    injector = {k: v.detach().clone() for k, v in model.injector_state_dict().items()}
    return dict(loss=loss.detach(), loss_after=loss_after, grads=grads, params=params, injector=injector)


@contextlib.contextmanager
def single_thread():
    """The tiny model runs fastest on one thread (and much slower on several on a loaded machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("case", list(CASES))
def test_fsdp_step_matches_single_process(distributed_results, case):
    results, _ = distributed_results
    options, trainable, lengths = CASES[case]
    with single_thread():
        ref = reference_step(options, trainable, lengths)
    rank0, rank1 = (r[case] for r in results)

    for r, res in enumerate((rank0, rank1)):
        d_loss = abs(res["loss"].item() - ref["loss"].item()) / abs(ref["loss"].item())
        assert d_loss <= RTOL, f"rank {r}: loss {res['loss'].item()} != single-process {ref['loss'].item()}"
    d_grad = assert_all_close(rank0["grads"], ref["grads"], "gradient")
    # the optimizer step: the same parameters on both ranks (bitwise) and as in one process
    for name, p in rank0["params"].items():
        assert torch.equal(p, rank1["params"][name]), f"rank 0 and rank 1 disagree on {name} after the step"
    d_param = assert_all_close(rank0["params"], ref["params"], "parameter after AdamW")
    assert_all_close(rank0["injector"], ref["injector"], "injector_state_dict after AdamW")
    d_after = abs(rank0["loss_after"].item() - ref["loss_after"].item()) / abs(ref["loss_after"].item())
    assert d_after <= RTOL, f"loss after the step {rank0['loss_after'].item()} != {ref['loss_after'].item()}"
    assert ref["loss_after"] < ref["loss"], "the step did not lower the loss"
    print(f"\n{case}: loss {ref['loss'].item():.6f}, max relative differences: loss {d_loss:.2g}, "
          f"gradients {d_grad:.2g}, parameters after AdamW {d_param:.2g}, loss after {d_after:.2g}")


def test_lower_model_gradients_are_included(distributed_results):
    """With every decoder layer trained, layers 0 and 1 get gradients from the decoder and from the
    lower model (they are the same modules): check, with a model whose lower layers are copies,
    that the single-process gradients are the sum of both uses and that the lower use matters,
    so the FSDP gradients compared in the "cross+top4" case include it."""
    results, _ = distributed_results
    options, trainable, lengths = CASES["cross+top4"]
    with single_thread():
        shared = reference_step(options, trainable, lengths)["grads"]
        copies = reference_step(dict(options, share_lower=False), trainable, lengths)["grads"]
    fsdp = results[0]["cross+top4"]["grads"]
    for i in range(2):
        names = [n for n in shared if n.startswith(f"base_model.model.layers.{i}.")]
        lower_norm = 0.0
        for name in names:
            upper = copies[name]
            # layer 1's q_proj, o_proj and MLP get nothing from the lower model: it stops at layer 1's k/v
            lower = copies["lower_layers." + name[len("base_model.model.layers."):]]
            lower = torch.zeros_like(upper) if lower is None else lower
            assert max_rel_diff(upper + lower, shared[name]) <= RTOL, f"{name}: not the sum of its two uses"
            lower_norm += lower.norm().item() ** 2
        total_norm = sum(fsdp[n].norm().item() ** 2 for n in names)
        # measured: about 0.45 (layer 0) and 0.27 (layer 1)
        share = (lower_norm / total_norm) ** 0.5
        print(f"\nlayer {i}: the lower model's share of the gradient norm: {share:.2f}")
        assert share > 0.05, f"layer {i}: the lower model's share of the gradient norm ({share:.3g}) is negligible"


def test_generate_matches_single_process(distributed_results):
    """Greedy generation with the sharded model (each rank its half of the batch) gives the
    single-process tokens. Rank 1's rows all stop after one token: it keeps running forward
    passes with rank 0 (synced_gpus; else rank 0 would wait for its all-gathers) and returns fewer
    columns, where the reference has padding."""
    results, _ = distributed_results
    assert results[1]["generate"].shape[1] < results[0]["generate"].shape[1], "rank 1 did not stop early"
    with single_thread():
        model = build_model(*CASES["cross"][:2])
        model.eval()
        ref = model.generate(**generate_inputs(make_batch(RAGGED)))
    for rank in range(WORLD_SIZE):
        got = results[rank]["generate"]
        expected = rank_slice(dict(ids=ref), rank)["ids"]
        assert torch.equal(got, expected[:, :got.shape[1]]), f"rank {rank}: generated {got.tolist()}, expected {expected.tolist()}"
        assert bool((expected[:, got.shape[1]:] == PAD).all())
