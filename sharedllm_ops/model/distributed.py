"""Data-parallel training of a :class:`SharedLLMForCausalLM` with FSDP2 (``torch.distributed.fsdp.fully_shard``).

Typical use, under ``torchrun --nproc-per-node N train.py``::

    env = init_distributed()                      # gloo on CPU, nccl on GPU (cuda:LOCAL_RANK)
    model = SharedLLMForCausalLM.from_base(base, ...)
    model.set_trainable("cross")                  # before sharding (see shard_model)
    shard_model(model)
    model.train()                                 # from_base returns it in eval mode
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=...)
    loss = model(input_ids=ids, labels=labels, context_input_ids=ctx, context_lengths=lens).loss
    loss.backward()                               # gradients are averaged over the ranks
    optimizer.step()
    state = full_injector_state_dict(model)       # collective: every rank calls it
    if env.is_main:
        save_file(state, ...)

FSDP2 works on CPU with gloo in this torch (2.14), so there is no FSDP1 fallback.

How the model is cut into FSDP units, and why
---------------------------------------------
FSDP2 all-gathers a unit's parameters in its forward pre-hook and reduce-scatters its gradients
after its backward; every rank must issue these collectives in the same order. The decoder
layers above the lower model (``layers[M:]``) run exactly once per forward, so each is its own
unit, as are the cross blocks. The layers of the **context path** are different:

* ``layers[0]`` encodes the retrieval query, ``lower[0]`` the tree nodes (both under no_grad, and
  only when some chunk of the rank's batch is long enough to split), and the lower model
  ``layers[:M]`` (or the ``lower_layers`` copies) encodes the context only when the rank's batch
  has context tokens. How often they run thus depends on each rank's data: as separate units
  their all-gathers would pair with other units' collectives on other ranks (gloo aborts with
  "Received data size doesn't match expected size"; with equal shapes the wrong weights could
  be gathered silently).
* The lower pass stops inside layer ``M - 1``'s attention (``StopEncoding``), so that call never
  reaches FSDP's post-forward hook; and the lower model's gradients flow back through the captured
  keys/values, not through the outputs of the layer calls, where FSDP registers the hook that
  gathers a unit again for the backward. With per-layer units (and the same data shape on every
  rank) the gradients do come out right, but only through FSDP's internal state: the interrupted
  call leaves layer ``M - 1``'s unit in its forward state, which keeps the decoder's call of that
  layer from registering the post-backward hook that would reshard it before the lower model's
  backward has used it.

So these layers stay in the **root** unit: the root all-gathers them once, before the forward,
keeps them unsharded through the backward (the root does not reshard after forward and its
inputs, token ids, need no gradient) and reduce-scatters their gradients once, at the end of the
backward, after every use (up to four calls in one forward) has accumulated into them. This
costs the memory of ``M`` unsharded layers (and their gradients, if trained) during a step; the
collectives no longer depend on the data. What must still be the same on every rank: every
rank passes a context (``context_input_ids``; ``context_lengths`` of 0 for rows without one) or
none does, since the cross blocks run only with a context.

Gradient scaling: FSDP averages gradients over the ranks, so with each rank's loss the mean over
its own tokens (what the model returns with ``labels``) the step is that of the mean of the
per-rank means (equal to the global token mean when the ranks have as many label tokens).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .modeling import SharedLLMForCausalLM

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistributedEnv:
    """Where this process stands: ``rank`` of ``world_size`` (``local_rank`` on its node), its
    ``device``, and the process group's ``backend`` (None when not distributed)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None


def _env_int(name: str, default: int | None = None) -> int:
    value = os.environ.get(name)
    if value is None:
        if default is None:
            raise RuntimeError(f"environment variable {name} is not set (launch with torchrun, which sets "
                               f"{', '.join(_TORCHRUN_VARS)})")
        return default
    try:
        return int(value)
    except ValueError:
        raise RuntimeError(f"environment variable {name} must be an integer, got {value!r}") from None


def init_distributed(
    backend: str | None = None, device: str | torch.device | None = None, timeout_s: float = 600.0
) -> DistributedEnv:
    """Joins the process group described by torchrun's environment variables.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and (through ``init_method="env://"``)
    ``MASTER_ADDR``/``MASTER_PORT``. ``device`` defaults to ``cuda:LOCAL_RANK`` when CUDA is
    available (made the current device) and ``cpu`` otherwise; ``backend`` to ``nccl`` on CUDA and
    ``gloo`` on CPU. Without ``WORLD_SIZE`` (a plain ``python`` run) nothing is initialised and a
    single-process environment is returned (``backend=None``). If a process group already
    exists it is reused. ``timeout_s`` bounds every collective (a stuck rank raises instead of
    hanging forever).
    """
    if device is None:
        local = _env_int("LOCAL_RANK", 0)
        device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", _env_int("LOCAL_RANK", 0))
    if device.type == "cuda":
        torch.cuda.set_device(device)

    if dist.is_available() and dist.is_initialized():
        return DistributedEnv(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0), device,
                              dist.get_backend())
    if "WORLD_SIZE" not in os.environ:
        return DistributedEnv(0, 1, 0, device, None)
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed")

    rank, world_size, local_rank = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK", 0)
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            raise RuntimeError(f"WORLD_SIZE is set but {name} is not (launch with torchrun, or set it)")
    if not 0 <= rank < world_size:
        raise RuntimeError(f"RANK ({rank}) must be in [0, WORLD_SIZE={world_size})")
    if backend is None:
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ValueError(f"the nccl backend needs a CUDA device, got {device}")
    dist.init_process_group(
        backend,
        init_method="env://",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
        device_id=device if backend == "nccl" else None,
    )
    return DistributedEnv(rank, world_size, local_rank, device, dist.get_backend())


def is_main_process() -> bool:
    """True on rank 0 (and in a non-distributed run); reads ``RANK`` before the group exists."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return _env_int("RANK", 0) == 0


def shard_model(
    model: SharedLLMForCausalLM,
    *,
    mesh=None,
    device: str | torch.device | None = None,
    reshard_after_forward: bool = True,
    mp_policy=None,
) -> SharedLLMForCausalLM:
    """Shards ``model`` in place with FSDP2 over ``mesh`` (default: all ranks of the default group
    on ``device``) and returns it.

    Units (see the module docstring): each decoder layer outside the context path, each cross
    block (its ``norm_c``, ``q_c`` and ``o_c`` as one group: the block itself is never called),
    and the root holding the rest (embeddings, final norm, ``lm_head``, ``layers[0]`` and the
    lower model). ``reshard_after_forward`` (``True``: free the gathered parameters after each
    unit's forward, gather them again for its backward) and ``mp_policy`` (a
    ``MixedPrecisionPolicy``) apply to every unit but the root, which never reshards after forward.

    Call :meth:`SharedLLMForCausalLM.set_trainable` **before** sharding (FSDP copies
    ``requires_grad`` when it builds the sharded parameters) and build the optimizer **after** it,
    from :func:`trainable_parameters` (the parameters ``set_trainable`` returned are replaced).
    Train by calling the model (its ``forward`` with ``context_input_ids``). ``generate`` works
    too (registered as a forward method; Hugging Face's ``synced_gpus`` defaults to True).
    ``compress_context`` called on its own is not a forward: it would meet sharded parameters.
    """
    # torch.distributed's submodules exist only in builds with distributed support: imported on use
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    from torch.distributed.tensor import DTensor

    if not isinstance(model, SharedLLMForCausalLM):
        raise TypeError(f"shard_model expects a SharedLLMForCausalLM, got {type(model).__name__}")
    if isinstance(model, FSDPModule) or any(isinstance(p, DTensor) for p in model.parameters()):
        raise ValueError("this model is already sharded")
    if mesh is None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("shard_model needs a process group: call init_distributed() first (under torchrun)")
        if device is None:
            device = _default_device()
        mesh = init_device_mesh(torch.device(device).type, (dist.get_world_size(),))
    options = dict(mesh=mesh, reshard_after_forward=reshard_after_forward,
                   mp_policy=mp_policy if mp_policy is not None else MixedPrecisionPolicy())

    layers = model.base_model.model.layers
    # the context path: the retrieval query runs layers[0], the node embeddings and the lower pass
    # run model._lower (layers[:M] when shared, else the lower_layers copies): all left to the root
    context_path = {id(layers[0])} | {id(layer) for layer in model._lower}
    for layer in layers:
        if id(layer) not in context_path:
            fully_shard(layer, **options)
    for block in model.cross_blocks.values():
        # CrossBlock has no forward: its submodules are called one by one inside the injected
        # layer's self_attn hook, so the group's hooks go on them (the first call all-gathers,
        # the last one reshards)
        fully_shard([block.norm_c, block.q_c, block.o_c], **options)
    # the root keeps its parameters (with the context path's layers) gathered from the forward to
    # the end of the backward, whatever the other units do
    fully_shard(model, **dict(options, reshard_after_forward=False))
    # generate() runs the base model's forward, not the root's: make it all-gather the root too.
    # (fully_shard marks the base model `_is_fsdp_managed_module`, so Hugging Face's generate()
    # defaults to synced_gpus=True: a rank whose rows all stopped keeps running forward passes
    # with the others, whose collectives would otherwise wait for it.)
    register_fsdp_forward_method(model, "generate")
    return model


def _default_device() -> torch.device:
    backend = dist.get_backend() if dist.is_initialized() else ""
    if "nccl" in str(backend) and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that require gradients (the sharded ones after :func:`shard_model`)."""
    return [p for p in model.parameters() if p.requires_grad]


def full_tensor(t: torch.Tensor | None) -> torch.Tensor | None:
    """The whole tensor of a sharded ``DTensor`` (a collective: every rank must call it); other
    tensors are returned as they are."""
    if t is None:
        return None
    from torch.distributed.tensor import DTensor  # on use, as in shard_model

    return t.full_tensor() if isinstance(t, DTensor) else t


def full_parameters(model: nn.Module, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """``{name: whole parameter}`` (detached) on every rank; a collective."""
    return {n: full_tensor(p.detach()) for n, p in model.named_parameters() if p.requires_grad or not trainable_only}


def full_gradients(model: nn.Module) -> dict[str, torch.Tensor | None]:
    """``{name: whole gradient}`` of the trainable parameters (None where there is none); a collective."""
    return {n: full_tensor(p.grad) for n, p in model.named_parameters() if p.requires_grad}


def full_injector_state_dict(model: SharedLLMForCausalLM) -> dict[str, torch.Tensor]:
    """:meth:`SharedLLMForCausalLM.injector_state_dict` with whole tensors, on every rank (a
    collective): what ``save_pretrained`` writes, for the main process to save."""
    return {k: full_tensor(v).detach() for k, v in model.injector_state_dict().items()}


def all_reduce_mean(value: torch.Tensor | float) -> torch.Tensor:
    """The mean of a scalar (e.g. the loss, for logging) over the ranks; the value itself when not
    distributed. A collective."""
    t = torch.as_tensor(value).detach().clone().float()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":
            t = t.to(_default_device())
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t.cpu()


__all__ = [
    "DistributedEnv",
    "all_reduce_mean",
    "full_gradients",
    "full_injector_state_dict",
    "full_parameters",
    "full_tensor",
    "init_distributed",
    "is_main_process",
    "shard_model",
    "trainable_parameters",
]
