"""``sharedllm-ops train`` (``sharedllm_ops.model.train``) on a tiny random Llama and a byte tokenizer.

* the training loop: a few steps lower the loss on held-out samples; activation checkpointing
  changes neither the losses nor the weights;
* checkpoints: an interrupted run resumes where it stopped and ends exactly as an uninterrupted
  run; a finished run can be extended;
* determinism: the losses depend on the seed only; ``draw_batch`` gives every rank its rows of a
  global batch that does not depend on the world size; ``lr_factor`` (warm-up, cosine to 10%);
* FSDP: two forked processes (gloo, CPU) train, save and resume with the losses and weights of
  the single-process run with the same global batch;
* the command: ``sharedllm-ops train`` in-process, and under ``torchrun --nproc-per-node 2``.

Every run is a handful of steps on samples of at most 96 tokens (each well under a second).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
import torch.distributed as dist  # noqa: E402

from conftest import free_port, run_workers  # noqa: E402

from sharedllm_ops.model import distributed  # noqa: E402
from sharedllm_ops.model import train as T  # noqa: E402
from sharedllm_ops.model.pretrained import tiny_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB = 260  # the tiny model's; the byte tokenizers' ids are below it
WORLD_SIZE = 2
TIMEOUT_S = 120  # each multi-process run; they normally take a few seconds
RTOL = 1e-5  # losses: FSDP vs one process (they differ by summation order: measured about 1e-7)
# weights after AdamW steps: Adam divides each gradient element by its running RMS (+ eps 1e-8), so
# an element whose gradient is tiny (q_c's are 0 on the first step, with o_c = 0) moves by an
# amount sensitive to its gradient's float32 rounding; measured up to 3e-5 of a tensor's scale
WEIGHT_RTOL = 2e-4
DATA_FILES = ("abc.py", "bisect.py", "colorsys.py")  # about 14K bytes of standard-library source
SMALL = dict(num_injected_layers=2, chunk_size=16, tree_depth=2, tokens_per_node=4, split_noise_std=0.2,
             injection="residual", positions="chunk", cross_init="copy_zero")


class ByteTokenizer:
    """The stub tokenizer ``train`` needs: one id per UTF-8 byte (1..256), end of sequence 0."""

    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False, verbose=False):
        return {"input_ids": [b + 1 for b in text.encode("utf-8")]}


def base_model():
    return tiny_model(vocab_size=VOCAB)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("text")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in DATA_FILES:
        shutil.copy(stdlib / name, folder / name)
    return folder


def config(data_dir: Path, output: Path, **overrides) -> T.TrainConfig:
    sharedllm = dict(SMALL, **overrides.pop("sharedllm", {}))
    fields = dict(data=[str(data_dir)], output=str(output), steps=6, batch_size=2, lr=1e-2, warmup=2,
                  context_tokens=64, min_context_tokens=16, decoder_tokens=32, save_every=100, seed=0,
                  sharedllm=sharedllm)
    fields.update(overrides)
    return T.TrainConfig(**fields)


def run(cfg: T.TrainConfig, **kwargs) -> dict:
    return T.train(cfg, base=base_model(), tokenizer=ByteTokenizer(), progress=False, **kwargs)


def injector(model) -> dict:
    return {k: v.detach().clone() for k, v in model.injector_state_dict().items()}


def assert_same_tensors(actual: dict, expected: dict, what: str, rtol: float = 0.0) -> float:
    """Bitwise equal (``rtol=0``), or within ``rtol`` of each tensor's largest magnitude; returns the worst."""
    assert sorted(actual) == sorted(expected), f"{what}: names differ"
    worst = 0.0
    for name, e in expected.items():
        a = actual[name]
        if rtol == 0.0:
            assert torch.equal(a, e), f"{what}: {name} differs"
        else:
            scale = max(e.abs().max().item(), 1e-12)
            d = (a.double() - e.double()).abs().max().item() / scale
            assert d <= rtol, f"{what}: {name} max relative difference {d:.3g} > {rtol}"
            worst = max(worst, d)
    return worst


def assert_losses_close(actual, expected, what: str) -> None:
    assert len(actual) == len(expected), f"{what}: {len(actual)} losses, expected {len(expected)}"
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert abs(a - e) <= RTOL * abs(e), f"{what}: step {i}: loss {a} != {e}\n{actual}\n{expected}"


def saved_state(checkpoint: Path) -> dict:
    return torch.load(Path(checkpoint) / T.STATE_NAME, weights_only=False)


# ----------------------------------------------------------------------------------------------
# the training loop


def test_a_few_steps_lower_the_held_out_loss(data_dir, tmp_path):
    cfg = config(data_dir, tmp_path / "run", steps=15)
    result = run(cfg)
    losses = result["losses"]
    assert len(losses) == 15 and all(map(torch.isfinite, torch.tensor(losses)))
    # held-out samples: a step the run never drew, in eval mode (no split noise)
    stream = T.token_stream(ByteTokenizer(), T.text_files(cfg.data))
    context, lengths, decoder, _ = T.draw_batch(stream, dataclasses.replace(cfg, batch_size=16), 10**6, 0, 0)
    model = result["model"].eval()
    with torch.no_grad():
        # cross_init="copy_zero": before training the model is the base model exactly
        before = base_model()(decoder, labels=decoder).loss.item()
        untrained = T.SharedLLMForCausalLM.from_base(base_model(), T.SharedLLMConfig(**cfg.sharedllm)).eval()
        assert untrained(decoder, context_input_ids=context, context_lengths=lengths,
                         labels=decoder).loss.item() == pytest.approx(before, rel=1e-6)
        after = model(decoder, context_input_ids=context, context_lengths=lengths, labels=decoder).loss.item()
    # measured: 5.57 -> 5.22 (16 x 31 scored tokens); the training losses' means of the first and last
    # three steps: 5.47 and 5.26
    assert after < before - 0.2, f"held-out loss {before:.4f} -> {after:.4f}"
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 0.1, f"training loss: first steps {losses[:3]}, last steps {losses[-3:]}"
    # the checkpoint of the last step holds the returned model's injector
    assert result["checkpoint"] == Path(cfg.output) / "step-15"
    reloaded = T.SharedLLMForCausalLM.from_pretrained(result["checkpoint"], base_model())
    assert_same_tensors(injector(reloaded), injector(model), "reloaded checkpoint")
    assert saved_state(result["checkpoint"])["losses"] == losses
    assert json.loads((result["checkpoint"] / "train_config.json").read_text()) == dataclasses.asdict(cfg)


def test_activation_checkpointing_trains_as_without_it(data_dir, tmp_path):
    """``--activation-checkpointing`` recomputes the layers in the backward, after the context's
    injection has ended: the losses and the trained weights must be those of the plain run."""
    plain = run(config(data_dir, tmp_path / "plain", steps=3))
    checkpointed = run(config(data_dir, tmp_path / "checkpointed", steps=3, activation_checkpointing=True))
    layers = checkpointed["model"].base_model.model.layers
    assert all(layer.gradient_checkpointing for layer in layers), "the run did not checkpoint"
    assert checkpointed["losses"] == plain["losses"]
    assert_same_tensors(injector(checkpointed["model"]), injector(plain["model"]), "checkpointed vs plain")


def test_the_distillation_target_is_the_base_model_with_full_attention(data_dir, tmp_path):
    """The teacher's rows are those of the plain base model (a fresh one, not the wrapper's) over the kept
    context and the decoder, even when the cross blocks already inject something; at ``copy_zero``
    initialisation the student is the base model on the decoder alone, so the KL to a teacher that sees
    no context is zero (the positions line up) and to one that sees the context it is not."""
    cfg = config(data_dir, tmp_path / "run", batch_size=3)
    stream = T.token_stream(ByteTokenizer(), T.text_files(cfg.data))
    context, lengths, decoder, _ = T.draw_batch(stream, cfg, 0, 0, 0)
    model = T.SharedLLMForCausalLM.from_base(base_model(), T.SharedLLMConfig(**cfg.sharedllm)).eval()
    with torch.no_grad():
        student = model(decoder, context_input_ids=context, context_lengths=lengths).logits
        blind = T.teacher_log_probs(model, context, lengths.tolist(), decoder, 0)
        seeing = T.teacher_log_probs(model, context, lengths.tolist(), decoder, 10)
        assert T.distillation_loss(student, blind).item() == pytest.approx(0.0, abs=1e-6)
        assert T.distillation_loss(student, seeing).item() > 1e-3
        for block in model.cross_blocks.values():  # injecting now changes the wrapper's outputs
            torch.nn.init.normal_(block.o_c.weight, std=0.5)
        injected = T.teacher_log_probs(model, context, lengths.tolist(), decoder, 10)
        n = int(lengths[1])
        plain = base_model()(torch.cat([context[1, n - 10 : n], decoder[1]])[None]).logits[0, 10:-1]
    assert seeing.shape == (3, decoder.shape[1] - 1, VOCAB)
    torch.testing.assert_close(injected, seeing, rtol=0, atol=0)
    torch.testing.assert_close(seeing[1], torch.log_softmax(plain, -1), rtol=1e-5, atol=1e-5)


def test_distillation_adds_the_weighted_kl_to_the_loss(data_dir, tmp_path):
    """First step, from the base model (``copy_zero``): loss = CE + 0.5 KL(teacher || student), both computed
    here by hand on the step's samples."""
    cfg = config(data_dir, tmp_path / "run", steps=1, distill_weight=0.5, distill_context_tokens=64)
    losses = run(cfg)["losses"]
    stream = T.token_stream(ByteTokenizer(), T.text_files(cfg.data))
    context, lengths, decoder, _ = T.draw_batch(stream, cfg, 0, 0, 0)
    model = T.SharedLLMForCausalLM.from_base(base_model(), T.SharedLLMConfig(**cfg.sharedllm)).eval()
    with torch.no_grad():
        out = model(decoder, labels=decoder)  # o_c = 0: the context changes nothing yet
        teacher = T.teacher_log_probs(model, context, lengths.tolist(), decoder, 64)
        expected = out.loss + 0.5 * T.distillation_loss(out.logits, teacher)
    assert losses[0] == pytest.approx(expected.item(), rel=1e-5)
    assert expected.item() > out.loss.item() + 1e-3  # the KL term is there


@pytest.mark.parametrize("change,message", [
    (dict(distill_weight=-1.0), "distill_weight"), (dict(distill_weight=float("inf")), "distill_weight"),
    (dict(distill_weight=True), "distill_weight"), (dict(distill_context_tokens=-1), "distill_context_tokens"),
    (dict(distill_weight=1.0, trainable="cross+top"), "trainable='cross'"),
    (dict(distill_weight=1.0, decoder_tokens=1), "decoder_tokens >= 2"),
    (dict(copy_fraction=1.5), "copy_fraction"), (dict(copy_fraction=True), "copy_fraction"),
    (dict(copy_fraction=0.3, distill_weight=1.0), "copy_fraction and distill_weight"),
    (dict(copy_tokens=8), "copy_tokens"),
])
def test_bad_distillation_settings_are_rejected(data_dir, tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        config(data_dir, tmp_path / "bad", **change)


class Interrupted(Exception):
    pass


def test_an_interrupted_run_resumes_where_it_stopped(data_dir, tmp_path, monkeypatch):
    """Steps 0-4 run, checkpoints at 2 and 4, then the run dies while drawing step 5's samples:
    the next run (the same command) resumes from step-4 and ends as an uninterrupted run."""
    steps = 7
    options = dict(steps=steps, save_every=2, weight_decay=0.1)
    full = run(config(data_dir, tmp_path / "full", **options))

    draw = T.draw_batch

    def dies_at_step_5(stream, cfg, step, micro, rank):
        if step == 5:
            raise Interrupted
        return draw(stream, cfg, step, micro, rank)

    cfg = config(data_dir, tmp_path / "resumed", **options)
    with monkeypatch.context() as m:
        m.setattr(T, "draw_batch", dies_at_step_5)
        with pytest.raises(Interrupted):
            run(cfg)
    assert T.latest_checkpoint(cfg.output) == Path(cfg.output) / "step-4"
    saved = saved_state(Path(cfg.output) / "step-4")["losses"]
    assert saved == full["losses"][:4]

    resumed = run(cfg)
    assert len(resumed["losses"]) == steps
    assert resumed["losses"][:4] == saved
    assert resumed["losses"] == full["losses"]  # bitwise: same samples, noise, optimizer and schedule state
    assert_same_tensors(injector(resumed["model"]), injector(full["model"]), "resumed run's final weights")
    assert sorted(p.name for p in Path(cfg.output).iterdir()) == ["step-2", "step-4", "step-6", "step-7"]

    # a finished run does nothing more; resume=False starts afresh
    again = run(cfg)
    assert again["losses"] == full["losses"] and again["checkpoint"] == Path(cfg.output) / "step-7"
    fresh = run(dataclasses.replace(cfg, steps=2), resume=False)
    assert fresh["losses"] == full["losses"][:2]


def test_a_finished_run_extends_to_more_steps(data_dir, tmp_path):
    """N steps, then the same output with steps = N + M: the run continues from step N. While the
    schedule is still warming up the learning rate does not depend on ``steps``, so the result is
    the uninterrupted N + M-step run's (later, cosine decay over N + M steps differs from N's)."""
    n, m = 3, 2
    cfg = config(data_dir, tmp_path / "extended", steps=n, save_every=2, warmup=10)
    first = run(cfg)
    assert [p.name for p in sorted(Path(cfg.output).iterdir())] == ["step-2", "step-3"]
    extended = run(dataclasses.replace(cfg, steps=n + m))
    assert len(extended["losses"]) == n + m and extended["losses"][:n] == first["losses"]
    assert extended["checkpoint"] == Path(cfg.output) / f"step-{n + m}"
    full = run(config(data_dir, tmp_path / "full", steps=n + m, save_every=2, warmup=10))
    assert extended["losses"] == full["losses"]
    assert_same_tensors(injector(extended["model"]), injector(full["model"]), "extended run's final weights")


def test_a_run_can_start_from_another_runs_injector_under_a_new_config(data_dir, tmp_path):
    """``init_from``: the weights of a trained injector, the tree setting of this run's config; zero
    steps of learning rate leave the weights as they were loaded."""
    first = run(config(data_dir, tmp_path / "first", steps=2))
    cfg = config(data_dir, tmp_path / "second", steps=1, lr=1e-30, init_from=str(first["checkpoint"]),
                 sharedllm={"tree_depth": SMALL["tree_depth"] + 1})
    second = run(cfg)
    assert second["model"].config.tree_depth == cfg.sharedllm["tree_depth"] != first["model"].config.tree_depth
    assert_same_tensors(injector(second["model"]), injector(first["model"]), "weights started from init_from",
                        rtol=1e-6)
    assert json.loads((second["checkpoint"] / "train_config.json").read_text())["init_from"] == cfg.init_from


# ----------------------------------------------------------------------------------------------
# determinism, samples, schedule


def test_the_losses_depend_on_the_seed_only(data_dir, tmp_path):
    a = run(config(data_dir, tmp_path / "a", steps=4))
    b = run(config(data_dir, tmp_path / "b", steps=4))
    c = run(config(data_dir, tmp_path / "c", steps=4, seed=1))
    assert a["losses"] == b["losses"]
    assert_same_tensors(injector(a["model"]), injector(b["model"]), "same seed")
    assert all(x != y for x, y in zip(a["losses"], c["losses"])), (a["losses"], c["losses"])


def test_draw_batch_rows_do_not_depend_on_the_world_size(monkeypatch):
    stream = torch.arange(5000)  # token k at position k: every window is recognisable
    cfg = T.TrainConfig(context_tokens=40, min_context_tokens=10, decoder_tokens=8, batch_size=6, seed=3)
    half = dataclasses.replace(cfg, batch_size=3)
    seen_lengths = set()
    for step, micro in ((0, 0), (0, 1), (7, 0)):
        context, lengths, decoder, _ = T.draw_batch(stream, cfg, step, micro, 0)
        assert context.shape == (6, 40) and lengths.shape == (6,) and decoder.shape == (6, 8)
        for i in range(6):
            n, d0 = int(lengths[i]), int(decoder[i, 0])
            assert cfg.min_context_tokens <= n <= cfg.context_tokens
            assert torch.equal(decoder[i], torch.arange(d0, d0 + 8))
            # the context ends where the decoder starts, right-padded with 0
            assert torch.equal(context[i, :n], torch.arange(d0 - n, d0)), (i, n, d0)
            assert not context[i, n:].any()
        seen_lengths |= set(lengths.tolist())
        # the same (seed, step, micro): the same samples
        assert all(torch.equal(x, y) for x, y in zip(T.draw_batch(stream, cfg, step, micro, 0),
                                                     (context, lengths, decoder)))

        with monkeypatch.context() as m:  # as under torchrun with 2 processes
            m.setattr(torch.distributed, "is_initialized", lambda: True)
            m.setattr(torch.distributed, "get_world_size", lambda *a, **k: 2)
            for rank in range(2):
                got = T.draw_batch(stream, half, step, micro, rank)
                for x, y in zip(got, (context, lengths, decoder)):
                    assert torch.equal(x, y[rank * 3:(rank + 1) * 3]), f"rank {rank} of step {step}, micro {micro}"
    assert len(seen_lengths) > 6  # the lengths are drawn, not fixed
    other = T.draw_batch(stream, dataclasses.replace(cfg, seed=4), 0, 0, 0)
    assert not torch.equal(other[2], T.draw_batch(stream, cfg, 0, 0, 0)[2])
    with pytest.raises(ValueError, match="fewer than one sample"):
        T.draw_batch(torch.arange(48), cfg, 0, 0, 0)
    # no context at all: one column of padding, every length 0
    no_context = dataclasses.replace(cfg, context_tokens=0, min_context_tokens=0)
    context, lengths, _, _ = T.draw_batch(stream, no_context, 0, 0, 0)
    assert context.shape == (6, 1) and not lengths.any()


def test_copy_samples_repeat_a_span_of_their_own_context(monkeypatch):
    """``copy_fraction``: that share of the samples has one run of ``16..copy_tokens`` decoder tokens taken
    verbatim from anywhere in its own context; the rest of the decoder, the context and the other samples
    are the plain draw's, on any world size."""
    stream = torch.arange(100_000)  # token k at position k: a copied run is recognisable
    plain = T.TrainConfig(context_tokens=300, min_context_tokens=20, decoder_tokens=64, batch_size=40, seed=5)
    cfg = dataclasses.replace(plain, copy_fraction=0.5, copy_tokens=48)
    context, lengths, decoder, seeds = T.draw_batch(stream, cfg, 3, 0, 0)
    ref = T.draw_batch(stream, plain, 3, 0, 0)
    assert torch.equal(context, ref[0]) and torch.equal(lengths, ref[1]) and torch.equal(seeds, ref[3])
    copied = 0
    for i in range(40):
        changed = (decoder[i] != ref[2][i]).nonzero().flatten()
        if changed.numel() == 0:
            continue
        copied += 1
        n = int(lengths[i])
        # one contiguous run of consecutive tokens, inside this sample's context
        first, last = int(changed[0]), int(changed[-1])
        run = decoder[i, first : last + 1]
        assert torch.equal(run, torch.arange(int(run[0]), int(run[0]) + run.numel())), i
        start = int(context[i, 0])
        assert start <= int(run[0]) and int(run[-1]) < start + n, (i, n)
        assert run.numel() <= min(cfg.copy_tokens, n)
    assert 10 <= copied <= 30, copied  # about half of 40 (a copied span can equal the tokens it replaces: never here)
    with monkeypatch.context() as m:  # as under torchrun with 2 processes: each rank its rows of the same batch
        m.setattr(torch.distributed, "is_initialized", lambda: True)
        m.setattr(torch.distributed, "get_world_size", lambda *a, **k: 2)
        half = dataclasses.replace(cfg, batch_size=20)
        assert torch.equal(T.draw_batch(stream, half, 3, 0, 1)[2], decoder[20:])
    every = T.draw_batch(stream, dataclasses.replace(cfg, copy_fraction=1.0), 3, 0, 0)[2]
    assert all(not torch.equal(every[i], ref[2][i]) for i in range(40) if lengths[i] >= T.MIN_COPY)


def test_lr_factor_warms_up_then_decays_to_a_tenth():
    cfg = T.TrainConfig(steps=20, warmup=4)
    f = [T.lr_factor(s, cfg) for s in range(25)]
    assert f[:5] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])
    assert f[12] == pytest.approx(0.55)  # half way through the decay
    assert all(a > b for a, b in zip(f[4:20], f[5:21]))
    assert f[20:] == pytest.approx([0.1] * 5)
    assert T.lr_factor(0, T.TrainConfig(steps=5, warmup=0)) == 1.0


def test_the_optimizer_follows_the_schedule(data_dir, tmp_path):
    cfg = config(data_dir, tmp_path / "lr", steps=3, warmup=2, save_every=1)
    run(cfg)
    for step in (1, 2, 3):
        state = saved_state(Path(cfg.output) / f"step-{step}")
        assert state["step"] == step
        # the learning rate of the next step
        assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(cfg.lr * T.lr_factor(step, cfg))


# ----------------------------------------------------------------------------------------------
# two processes with FSDP (gloo)

PER_RANK = 1  # samples per process; the single-process run takes WORLD_SIZE times as many
NO_NOISE = dict(split_noise_std=0.0)
DISTILL = dict(distill_weight=1.0, distill_context_tokens=64)


def fsdp_config(data_dir, output, **overrides):
    # warmup > steps: the schedule does not depend on `steps` (the resumed runs extend to more).
    # The gradients' norm is 1.1 to 1.8 at these steps: clipping to max_grad_norm=1 is active (and
    # must use the global norm of the sharded gradients)
    return config(data_dir, output, **dict(dict(steps=3, batch_size=PER_RANK, warmup=10, save_every=3), **overrides))


def _worker(rank: int, port: int, out_dir: str, data_dir: str) -> None:
    torch.set_num_threads(1)  # two workers on the same cores; also the safe setting after fork
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    out, data = Path(out_dir), Path(data_dir)
    results = {}

    def record(name, result):
        model = result["model"]
        results[name] = dict(losses=result["losses"], checkpoint=str(result["checkpoint"]),
                             injector=distributed.full_injector_state_dict(model))  # a collective

    try:
        # 3 steps, then extended to 5 (a distributed resume: FSDP optimizer state from the checkpoint)
        record("fresh", run(fsdp_config(data, out / "fsdp", sharedllm=NO_NOISE)))
        record("resumed", run(fsdp_config(data, out / "fsdp", sharedllm=NO_NOISE, steps=5)))
        # a single-process checkpoint (prepared by the test) resumed by two processes
        record("from-single", run(fsdp_config(data, out / "from-single", sharedllm=NO_NOISE, steps=5)))
        # with split noise (the default)
        record("noise", run(fsdp_config(data, out / "noise")))
        # with distillation: the teacher's forward must gather the sharded weights too
        record("distill", run(fsdp_config(data, out / "distill", sharedllm=NO_NOISE, **DISTILL)))
    finally:
        torch.save(results, out / f"rank{rank}.pt")
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.fixture(scope="module")
def fsdp_results(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    # single-process references: WORLD_SIZE * PER_RANK samples per step
    refs = {}
    single = dict(batch_size=WORLD_SIZE * PER_RANK)
    refs["fresh"] = run(fsdp_config(data_dir, out / "single", sharedllm=NO_NOISE, **single))
    refs["fresh"]["injector"] = injector(refs["fresh"]["model"])
    shutil.copytree(out / "single", out / "from-single")
    refs["resumed"] = run(fsdp_config(data_dir, out / "single", sharedllm=NO_NOISE, steps=5, **single))
    refs["resumed"]["injector"] = injector(refs["resumed"]["model"])
    refs["noise"] = run(fsdp_config(data_dir, out / "single-noise", **single))
    refs["noise"]["injector"] = injector(refs["noise"]["model"])
    refs["distill"] = run(fsdp_config(data_dir, out / "single-distill", sharedllm=NO_NOISE, **DISTILL, **single))
    refs["distill"]["injector"] = injector(refs["distill"]["model"])

    elapsed = run_workers(_worker, (free_port(), str(out), str(data_dir)), WORLD_SIZE, TIMEOUT_S,
                          f"the {WORLD_SIZE}-process training")
    print(f"\n{WORLD_SIZE}-process training runs: {elapsed:.1f} s")
    ranks = [torch.load(out / f"rank{r}.pt") for r in range(WORLD_SIZE)]
    return ranks, refs, out


@pytest.mark.parametrize("case", ["fresh", "resumed", "from-single", "distill"])
def test_fsdp_training_matches_the_single_process_run(fsdp_results, case):
    ranks, refs, out = fsdp_results
    ref = refs["resumed" if case == "from-single" else case]
    for rank, res in enumerate(ranks):
        assert case in res, f"rank {rank} did not finish {case!r}"
        assert_losses_close(res[case]["losses"], ref["losses"], f"rank {rank}, {case}")
        assert_same_tensors(res[case]["injector"], ranks[0][case]["injector"], f"rank {rank} vs rank 0, {case}")
    d = assert_same_tensors(ranks[0][case]["injector"], ref["injector"], f"{case}: FSDP vs single process",
                            rtol=WEIGHT_RTOL)
    print(f"\n{case}: injector weights, max relative difference {d:.2g}")
    # rank 0 saved the whole injector and the trainer state
    checkpoint = Path(ranks[0][case]["checkpoint"])
    assert checkpoint.name == f"step-{len(ref['losses'])}"
    reloaded = T.SharedLLMForCausalLM.from_pretrained(checkpoint, base_model())
    assert_same_tensors(injector(reloaded), ranks[0][case]["injector"], f"{case}: saved checkpoint")
    state = saved_state(checkpoint)
    assert state["step"] == len(ref["losses"]) and state["losses"] == ranks[0][case]["losses"]
    if case == "resumed":
        assert ranks[0]["resumed"]["losses"][:3] == ranks[0]["fresh"]["losses"]


def test_an_fsdp_checkpoint_resumes_in_one_process(fsdp_results, data_dir, tmp_path):
    ranks, refs, out = fsdp_results
    shutil.copytree(out / "fsdp" / "step-3", tmp_path / "step-3")  # the 2-process run's first checkpoint
    resumed = run(fsdp_config(data_dir, tmp_path, sharedllm=NO_NOISE, steps=5, batch_size=WORLD_SIZE * PER_RANK))
    assert resumed["losses"][:3] == ranks[0]["fresh"]["losses"]
    assert_losses_close(resumed["losses"], refs["resumed"]["losses"], "FSDP checkpoint resumed in one process")
    assert_same_tensors(injector(resumed["model"]), refs["resumed"]["injector"], "FSDP checkpoint resumed",
                        rtol=WEIGHT_RTOL)


def test_fsdp_training_with_split_noise_matches_the_single_process_run(fsdp_results):
    """Split noise is keyed by each sample's seed, so a row gets the same noise on any rank."""
    ranks, refs, _ = fsdp_results
    assert_losses_close(ranks[0]["noise"]["losses"], refs["noise"]["losses"], "split noise 0.2")


# ----------------------------------------------------------------------------------------------
# the command


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """The tiny model and a byte-level tokenizer (257 ids) as a Hugging Face folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-model")
    base_model().save_pretrained(folder)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={"<eos>": 0, **{c: i + 1 for i, c in enumerate(alphabet)}}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(folder)
    return folder


def cli_args(model_dir, data_dir, output, *extra) -> list[str]:
    small = dict(SMALL, split_noise_std=0.0)
    return ["train", "--model", str(model_dir), "--data", str(data_dir), "--output", str(output),
            "--steps", "2", "--context-tokens", "64", "--min-context-tokens", "16", "--decoder-tokens", "32",
            "--lr", "1e-2", "--warmup", "2", "--config", json.dumps(small), *extra]


def test_the_train_command(model_dir, data_dir, tmp_path, capsys):
    from sharedllm_ops.cli import main

    output = tmp_path / "cli"
    assert main(cli_args(model_dir, data_dir, output, "--batch-size", "2", "--save-every", "1",
                         "--eval-modules", "fnmatch.py")) == 0
    out = capsys.readouterr().out
    assert "trained 2 steps" in out and str(output / "step-2") in out, out
    # the held-out table, tokenized with the model's own tokenizer
    assert "| fnmatch.py |" in out, out
    assert [p.name for p in sorted(output.iterdir())] == ["step-1", "step-2"]
    saved = json.loads((output / "step-2" / "train_config.json").read_text())
    assert saved["steps"] == 2 and saved["batch_size"] == 2 and saved["sharedllm"]["chunk_size"] == 16
    assert saved["model"] == str(model_dir) and saved["data"] == [str(data_dir)]
    # the same run with the model and tokenizer given directly: the same losses
    from transformers import AutoTokenizer

    direct = T.train(T.TrainConfig(**dict(saved, output=str(tmp_path / "direct"))), base=base_model(),
                     tokenizer=AutoTokenizer.from_pretrained(model_dir), progress=False)
    assert saved_state(output / "step-2")["losses"] == direct["losses"]


def test_the_train_command_under_torchrun(model_dir, data_dir, tmp_path):
    """``torchrun --nproc-per-node 2 -m sharedllm_ops train``: one sample per process and step, the
    losses of the single-process command with two samples per step."""
    from sharedllm_ops.cli import main

    single, multi = tmp_path / "single", tmp_path / "torchrun"
    assert main(cli_args(model_dir, data_dir, single, "--batch-size", "2", "--eval-modules")) == 0
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.is_file():
        pytest.skip(f"no torchrun next to {sys.executable}")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                               "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    command = [str(torchrun), "--nproc-per-node", str(WORLD_SIZE), "--master-addr", "127.0.0.1",
               "--master-port", str(free_port()), "-m", "sharedllm_ops",
               *cli_args(model_dir, data_dir, multi, "--batch-size", "1", "--eval-modules", "fnmatch.py")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, env=env,
                            cwd=Path(__file__).parent.parent)
    assert result.returncode == 0, f"rc {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    assert "| fnmatch.py |" in result.stdout, result.stdout
    assert_losses_close(saved_state(multi / "step-2")["losses"], saved_state(single / "step-2")["losses"],
                        "torchrun vs single process")
    reloaded = [injector(T.SharedLLMForCausalLM.from_pretrained(folder / "step-2", base_model()))
                for folder in (multi, single)]
    d = assert_same_tensors(*reloaded, "torchrun vs single process", rtol=WEIGHT_RTOL)
    print(f"\ntorchrun: injector weights, max relative difference {d:.2g}")
