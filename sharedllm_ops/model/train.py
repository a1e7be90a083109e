"""``sharedllm-ops train``: continual pre-training of SharedLLM's cross blocks, as in the paper.

Samples are windows of a token stream made from the training texts: ``context`` tokens (the
compressed context) followed by ``decoder`` tokens; the loss is next-token prediction on the
decoder tokens, plus (``distill_weight > 0``) the KL divergence from the base model's own predictions
with full attention over the last ``distill_context_tokens`` of the context: a dense signal of what
the context should change. Split noise is on while training. AdamW with linear warm-up and cosine decay,
gradient accumulation, bf16 autocast on GPU, optional activation checkpointing, checkpoints with
``save_pretrained`` plus the trainer state (resume continues where it stopped), and a held-out
perplexity table at the end. Deterministic given the seed: the samples of step ``s`` depend only
on ``(seed, s)``, so a resumed run sees what an uninterrupted one would have.

Under ``torchrun`` every rank takes its share of each global batch and the model is sharded
with FSDP2 (``distributed.py``): the loss and updates equal the single-process run's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..dtypes import DTYPES
from . import distributed
from .config import SharedLLMConfig
from .modeling import WEIGHTS_NAME, SharedLLMForCausalLM
from .pretrained import load_base_model
from .text import site_packages_files, training_files

STATE_NAME = "trainer_state.pt"
TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst")
MIN_COPY = 16  # shortest copied span of a copy sample


@dataclass
class TrainConfig:
    """Everything a training run depends on (saved with each checkpoint)."""

    model: str | None = None  # base model path; None = the embedded SmolLM2-135M
    # files, folders, "stdlib" (the standard-library training packages) or "site-packages[:MB]" (a sample of
    # MB megabytes of the installed third-party packages' sources); empty = "stdlib"
    data: list = field(default_factory=list)
    output: str = "runs/sharedllm"
    steps: int = 200
    batch_size: int = 1  # sequences per micro-batch per process
    grad_accum: int = 1
    lr: float = 2e-4
    warmup: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    context_tokens: int = 4096  # longest context of a sample
    min_context_tokens: int = 1024  # shortest (each sample draws its length in between)
    decoder_tokens: int = 512
    trainable: str = "cross"  # "cross" | "cross+top"
    top_layers: int = 0
    # an injector folder whose weights start the run (its saved config with ``sharedllm`` over it): continue a
    # trained injector under another tree setting or with more injected layers (those start as
    # ``cross_init`` says); ignored when resuming from ``output``
    init_from: str | None = None
    seed: int = 0
    save_every: int = 50
    log_every: int = 1
    activation_checkpointing: bool = False
    dtype: str = "float32"  # weights; on GPU the forward also runs under bf16 autocast
    # distillation: loss = CE + distill_weight * KL(teacher || student) per decoder token, the teacher being the
    # base model with full attention over the last distill_context_tokens context tokens and the decoder tokens
    distill_weight: float = 0.0
    distill_context_tokens: int = 3584
    # copy training: in this share of the samples a span of 16..copy_tokens context tokens is written over the
    # decoder at a random place, so that predicting it needs the context's detail, not its gist
    copy_fraction: float = 0.0
    copy_tokens: int = 128
    sharedllm: dict = field(default_factory=lambda: dict(
        num_injected_layers=4, chunk_size=1024, tree_depth=3, tokens_per_node=32, split_noise_std=0.2,
        injection="residual", positions="chunk", cross_init="copy_zero"))

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum", "decoder_tokens", "save_every", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive int, got {value!r}")
        if not 0 <= self.min_context_tokens <= self.context_tokens:
            raise ValueError("need 0 <= min_context_tokens <= context_tokens, got "
                             f"{self.min_context_tokens} and {self.context_tokens}")
        if self.trainable not in ("cross", "cross+top"):
            raise ValueError(f"TrainConfig.trainable must be 'cross' or 'cross+top', got {self.trainable!r}")
        if isinstance(self.distill_weight, bool) or not isinstance(self.distill_weight, (int, float)) \
                or not 0 <= self.distill_weight < math.inf:
            raise ValueError(f"TrainConfig.distill_weight must be a finite float >= 0, got {self.distill_weight!r}")
        if self.distill_weight > 0 and self.trainable != "cross":
            raise ValueError("distillation needs trainable='cross': the teacher is the base model, whose top layers "
                             f"trainable={self.trainable!r} would train")
        if self.distill_weight > 0 and self.decoder_tokens < 2:
            raise ValueError(f"distillation needs decoder_tokens >= 2 (a next token to predict), got {self.decoder_tokens}")
        if not isinstance(self.distill_context_tokens, int) or self.distill_context_tokens < 0:
            raise ValueError(f"TrainConfig.distill_context_tokens must be an int >= 0, got {self.distill_context_tokens!r}")
        if isinstance(self.copy_fraction, bool) or not isinstance(self.copy_fraction, (int, float)) \
                or not 0 <= self.copy_fraction <= 1:
            raise ValueError(f"TrainConfig.copy_fraction must be a float in [0, 1], got {self.copy_fraction!r}")
        if isinstance(self.copy_tokens, bool) or not isinstance(self.copy_tokens, int) or self.copy_tokens < MIN_COPY:
            raise ValueError(f"TrainConfig.copy_tokens must be an int >= {MIN_COPY}, got {self.copy_tokens!r}")
        if self.copy_fraction > 0 and self.distill_weight > 0:
            # the teacher sees only the last distill_context_tokens: its KL would train against copying older spans
            raise ValueError("TrainConfig.copy_fraction and distill_weight cannot both be > 0 (the teacher does not "
                             "see most copied spans)")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr must be positive, got {self.lr}")


def text_files(paths) -> list[Path]:
    """The training files of ``paths``: files, folders (searched for text and source files), ``"stdlib"``
    (:func:`~sharedllm_ops.model.text.training_files`) or ``"site-packages[:MB]"``
    (:func:`~sharedllm_ops.model.text.site_packages_files`, a sample of ``MB`` megabytes), in that order."""
    if not paths:
        return training_files()
    files = []
    for name in paths:
        source, _, megabytes = str(name).partition(":")
        if source == "stdlib" and not megabytes:
            files += training_files()
            continue
        if source == "site-packages":
            try:
                budget = None if not megabytes else int(float(megabytes) * 1e6)
            except ValueError:
                raise ValueError(f"training data {name!r}: expected site-packages:MB with MB a number") from None
            files += site_packages_files(budget)
            continue
        p = Path(name)
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES)
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"training data {p} does not exist")
    if not files:
        raise ValueError(f"no text files found in {list(map(str, paths))}")
    return files


def token_stream(tokenizer, files) -> torch.Tensor:
    """int64 ``[N]``: every file's tokens, separated by the end-of-sequence token."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    parts = []
    for f in files:
        ids = tokenizer(f.read_text(encoding="utf-8", errors="replace"), add_special_tokens=False,
                        verbose=False)["input_ids"]
        parts.append(torch.tensor(ids + [eos], dtype=torch.long))
    return torch.cat(parts)


def draw_batch(stream: torch.Tensor, cfg: TrainConfig, step: int, micro: int, rank: int):
    """The samples of one micro-batch of one process: ``(context [b, Lc], context_lengths [b], decoder [b, Ld],
    split_noise_seeds [b])``.

    The global batch of (step, micro) is drawn from ``(seed, step, micro)`` alone and split by rank."""
    world_rows = cfg.batch_size * max(1, torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1)
    # a hash, since torch's generator keeps only 32 bits of its seed: arithmetic keys would collide
    digest = hashlib.sha256(f"{cfg.seed}/{step}/{micro}".encode()).digest()
    sample_key = int.from_bytes(digest[:8], "little") >> 2  # 62 bits
    g = torch.Generator().manual_seed(sample_key)
    span = cfg.context_tokens + cfg.decoder_tokens
    if stream.numel() <= span:
        raise ValueError(f"the training text has {stream.numel()} tokens, fewer than one sample ({span})")
    starts = torch.randint(0, stream.numel() - span, (world_rows,), generator=g)
    lengths = torch.randint(cfg.min_context_tokens, cfg.context_tokens + 1, (world_rows,), generator=g)
    rows = slice(rank * cfg.batch_size, (rank + 1) * cfg.batch_size)
    starts, lengths = starts[rows], lengths[rows]
    context = torch.zeros(cfg.batch_size, max(cfg.context_tokens, 1), dtype=torch.long)
    decoder = torch.empty(cfg.batch_size, cfg.decoder_tokens, dtype=torch.long)
    for i, (s, n) in enumerate(zip(starts.tolist(), lengths.tolist())):
        # the context ends where the decoder starts: the decoder continues the text
        first = s + cfg.context_tokens - n
        context[i, :n] = stream[first : first + n]
        decoder[i] = stream[s + cfg.context_tokens : s + span]
    if cfg.copy_fraction > 0:
        copy_key = int.from_bytes(digest[8:16], "little") >> 2  # its own stream: runs without copies are unchanged
        copy_spans(context, lengths, decoder, cfg, copy_key, world_rows, rows)
    # one split-noise seed per sample of the global batch: its noise is the same on any rank
    seeds = (sample_key + torch.arange(world_rows)) % 2**62
    return context, lengths, decoder, seeds[rows]


def copy_spans(context, lengths, decoder, cfg: TrainConfig, key: int, world_rows: int, rows: slice) -> None:
    """Copy training, in place: in a ``cfg.copy_fraction`` share of the global batch's samples (drawn from
    ``key``), a span of ``MIN_COPY..copy_tokens`` tokens from anywhere in the sample's context overwrites the
    decoder at a random offset. Retrieval then has something exact to find, as with the needles and copy
    warm-ups that taught published compressors to keep detail (research notes, issue 16)."""
    g = torch.Generator().manual_seed(key)
    chosen = torch.rand(world_rows, generator=g) < cfg.copy_fraction
    span = torch.randint(MIN_COPY, cfg.copy_tokens + 1, (world_rows,), generator=g)
    source, target = torch.rand(world_rows, generator=g), torch.rand(world_rows, generator=g)
    for i, (copy, n, src, dst) in enumerate(zip(chosen[rows].tolist(), span[rows].tolist(), source[rows].tolist(),
                                                target[rows].tolist())):
        n = min(n, int(lengths[i]), decoder.shape[1])
        if not copy or n < MIN_COPY:
            continue
        first = int(src * (int(lengths[i]) - n + 1))
        at = int(dst * (decoder.shape[1] - n + 1))
        decoder[i, at : at + n] = context[i, first : first + n]


@torch.no_grad()
def teacher_log_probs(model, context, lengths: list[int], decoder, context_tokens: int) -> torch.Tensor:
    """float32 ``[b, Ld - 1, V]``: log-probabilities of the base model alone for the decoder's next tokens, with
    full attention over the last ``context_tokens`` tokens of each sample's context (``lengths``, on the host)
    and the decoder. ``model`` is the wrapper, called without a context: the plain base model, through the
    wrapper's forward so that FSDP gathers the sharded weights first."""
    rows = []
    for i in range(decoder.shape[0]):
        keep = min(lengths[i], context_tokens)
        ids = torch.cat([context[i, lengths[i] - keep : lengths[i]], decoder[i]]).unsqueeze(0)
        logits = model(input_ids=ids, logits_to_keep=decoder.shape[1], use_cache=False).logits[:, :-1]
        rows.append(F.log_softmax(logits.float(), dim=-1))
    return torch.cat(rows)


def distillation_loss(student_logits: torch.Tensor, teacher_log_probs: torch.Tensor) -> torch.Tensor:
    """Mean over decoder tokens of KL(teacher || student); the student's ``[b, Ld, V]`` logits are aligned with
    the teacher's ``[b, Ld - 1, V]`` (the last position predicts past the decoder and has no target)."""
    student = F.log_softmax(student_logits[:, :-1].float(), dim=-1).flatten(0, 1)
    return F.kl_div(student, teacher_log_probs.flatten(0, 1), log_target=True, reduction="batchmean")


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 10% at ``steps``."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def latest_checkpoint(output: str | os.PathLike) -> Path | None:
    steps = sorted(Path(output).glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    complete = [p for p in steps if (p / STATE_NAME).is_file()]
    return complete[-1] if complete else None


def train(cfg: TrainConfig, *, base=None, tokenizer=None, resume: bool = True, progress: bool = True) -> dict:
    """Runs (or resumes) a training run; returns ``{"losses": [...per step...], "model": model, "checkpoint": path,
    "tokenizer": tokenizer}``.

    ``base``/``tokenizer`` may be given (tests); otherwise ``cfg.model`` is loaded."""
    env = distributed.init_distributed()
    torch.manual_seed(cfg.seed)
    dtype = DTYPES[cfg.dtype]
    if base is None:
        base, tokenizer = load_base_model(cfg.model, dtype=dtype, device=env.device)
    stream = token_stream(tokenizer, text_files(cfg.data))
    output = Path(cfg.output)
    checkpoint = latest_checkpoint(output) if resume else None
    if checkpoint is not None:
        model = SharedLLMForCausalLM.from_pretrained(checkpoint, base)
    elif cfg.init_from is not None:
        model = SharedLLMForCausalLM.from_pretrained(cfg.init_from, base, missing_ok=True, **cfg.sharedllm)
        if model._trained_base_layers:  # set_trainable below would drop them from every checkpoint
            raise ValueError(f"init_from {cfg.init_from} has trained base layers {model._trained_base_layers}: "
                             "a run can start from an injector's cross blocks only")
    else:
        model = SharedLLMForCausalLM.from_base(base, SharedLLMConfig(**cfg.sharedllm))
    model.set_trainable(cfg.trainable, cfg.top_layers)
    if cfg.activation_checkpointing:
        if env.distributed:
            raise ValueError("activation_checkpointing is not supported together with FSDP here")
        enable_activation_checkpointing(model.base_model)
    if env.distributed:
        distributed.shard_model(model, device=env.device)
    params = distributed.trainable_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    start_step, losses = 0, []
    if checkpoint is not None:
        state = torch.load(checkpoint / STATE_NAME, weights_only=False)
        _warn_if_config_changed(checkpoint, cfg, state.get("world_size", 1), env.world_size)
        # torch.distributed's submodules exist only in builds with distributed support
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        # keyed by parameter name, so that a checkpoint of any world size resumes under any other
        set_optimizer_state_dict(model, optimizer, _optimizer_state_by_name(model, state["optimizer"]),
                                 options=StateDictOptions(full_state_dict=env.distributed))
        scheduler.load_state_dict(state["scheduler"])
        start_step, losses = state["step"], state["losses"]
    model.train()

    bar = None
    if progress and env.is_main:
        bar = tqdm(total=cfg.steps, initial=start_step, desc="train", unit="step")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if env.device.type == "cuda" else _nothing()
    tokens_done, started = 0, time.perf_counter()
    for step in range(start_step, cfg.steps):
        torch.manual_seed(cfg.seed * 7919 + step)  # anything random beyond the keyed split noise
        step_loss = 0.0
        for micro in range(cfg.grad_accum):
            context, lengths, decoder, seeds = draw_batch(stream, cfg, step, micro, env.rank)
            host_lengths = lengths.tolist()
            context, lengths, decoder = context.to(env.device), lengths.to(env.device), decoder.to(env.device)
            with autocast:
                target = None
                if cfg.distill_weight > 0:
                    target = teacher_log_probs(model, context, host_lengths, decoder, cfg.distill_context_tokens)
                out = model(decoder, context_input_ids=context, context_lengths=lengths, labels=decoder,
                            split_noise_seeds=seeds)
                loss = out.loss
                if target is not None:
                    loss = loss + cfg.distill_weight * distillation_loss(out.logits, target)
            (loss / cfg.grad_accum).backward()
            step_loss += loss.detach().float() / cfg.grad_accum
            tokens_done += decoder.numel() + int(lengths.sum())
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss = float(distributed.all_reduce_mean(step_loss))
        losses.append(loss)
        if bar is not None:
            bar.update(1)
            if (step + 1) % cfg.log_every == 0:
                rate = tokens_done * env.world_size / (time.perf_counter() - started)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}", tok_s=f"{rate:.0f}")
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            checkpoint = save_checkpoint(model, optimizer, scheduler, cfg, step + 1, losses, env)
    if bar is not None:
        bar.close()
    return {"losses": losses, "model": model, "checkpoint": checkpoint, "tokenizer": tokenizer}


def enable_activation_checkpointing(base) -> None:
    """Non-reentrant activation checkpointing of every decoder layer of the (wrapped) base model.

    The wrapper makes the recomputation in the backward see the injected context (see
    ``InjectionState.replay_safe``), so the loss and the gradients are those without checkpointing."""
    options = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):  # the newer name; the old one warns where both exist
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
    # transformers also makes the embeddings' output require grad, which only reentrant checkpointing needs;
    # here it would make the frozen lower model's context pass keep an autograd graph for nothing
    base.disable_input_require_grads()


def _optimizer_state_by_name(model, state: dict) -> dict:
    """A single-process ``optimizer.state_dict()`` (parameters numbered in the optimizer's order:
    the trainable parameters in ``named_parameters`` order) keyed by parameter name, as the FSDP
    checkpoints' (``get_optimizer_state_dict``) are; a state keyed by name is returned as it is."""
    if not any(isinstance(i, int) for group in state["param_groups"] for i in group["params"]):
        return state
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    return {"state": {names[i]: v for i, v in state["state"].items()},
            "param_groups": [dict(g, params=[names[i] for i in g["params"]]) for g in state["param_groups"]]}


# what may change between a run and its resumption without changing what it computes
_RESUMABLE_CHANGES = {"steps", "output", "save_every", "log_every"}


def _warn_if_config_changed(checkpoint: Path, cfg: TrainConfig, saved_world: int, world: int) -> None:
    """Resuming with other settings is allowed but rarely meant: say which ones differ (``steps``
    may grow; note that it also stretches the cosine decay)."""
    saved_file = checkpoint / "train_config.json"
    if not saved_file.is_file():
        return
    saved = json.loads(saved_file.read_text())
    current = json.loads(json.dumps(dataclasses.asdict(cfg)))  # the same JSON types as the saved copy
    changed = sorted(k for k in current if k not in _RESUMABLE_CHANGES | {"batch_size"} and saved.get(k) != current[k])
    if saved.get("batch_size", 0) * saved_world != cfg.batch_size * world:  # the global batch may be split anew
        changed.append("batch_size x processes")
    if changed:
        warnings.warn(f"resuming {checkpoint} with settings that differ from its run: {changed} "
                      "(the checkpoint's SharedLLM config is kept)", RuntimeWarning, stacklevel=3)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def save_checkpoint(model, optimizer, scheduler, cfg: TrainConfig, step: int, losses: list, env) -> Path:
    """``output/step-N``: the injector (``save_pretrained`` format), the run's config and the trainer state."""
    folder = Path(cfg.output) / f"step-{step}"
    weights = distributed.full_injector_state_dict(model) if env.distributed else None
    optim_state = optimizer.state_dict()
    if env.distributed:
        # torch.distributed's submodules exist only in builds with distributed support
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        optim_state = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                        cpu_offload=True))
    if env.is_main:
        inner = model
        if weights is None:
            inner.save_pretrained(folder)
        else:
            _save_injector(inner, weights, folder)
        with open(folder / "train_config.json", "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=2)
        torch.save({"step": step, "losses": losses, "optimizer": optim_state, "scheduler": scheduler.state_dict(),
                    "world_size": env.world_size},
                   folder / (STATE_NAME + ".tmp"))
        os.replace(folder / (STATE_NAME + ".tmp"), folder / STATE_NAME)  # the marker of a complete checkpoint
    if env.distributed:
        torch.distributed.barrier()
    return folder


def _save_injector(model: SharedLLMForCausalLM, weights: dict, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save(folder)
    meta = {"trained_base_layers": ",".join(map(str, model._trained_base_layers))}
    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, folder / WEIGHTS_NAME, metadata=meta)


__all__ = ["TrainConfig", "draw_batch", "enable_activation_checkpointing", "latest_checkpoint", "lr_factor",
           "save_checkpoint", "text_files", "token_stream", "train"]
