"""Data-parallel training on several processes (torchrun): DDP or FSDP, with the same loop.

The training loop (:mod:`adapterlab.train`) calls it.

The release's recipe (docs/method.md) trains on 8 GPUs with torchrun + DDP, total batch 64.
Here every process ("rank") holds the frozen base and a replica of the adapter:

    torchrun --nproc_per_node 8 -m adapterlab finetune --strategy ddp --batch-size 64 ...

    every rank: the same global batch order (a pure function of seed and step)
                -> its share of every global batch (batch[rank::world], adapterlab.data.StepSampler)
                -> forward / backward on its share
    DDP:        all-reduce (average) the gradients of the parameters that require grad -
                only the adapter (1.2M values at 7B), never the 7B frozen weights
    every rank: the same AdamW step on the same averaged gradient -> identical replicas

FSDP (``--strategy fsdp``, torch's own ``fully_shard``) also shards the *frozen base* across
ranks, so a 13B or 65B base that does not fit one GPU still trains. The trainable tensors are
left out of sharding (``ignored_params``): they stay whole, in fp32, on every rank, and
:func:`sync_gradients` averages their gradients after backward.

Nothing in a checkpoint depends on the world size: the position in the data is the global
step (global samples = step * global batch), and the adapter is stored whole. A run written
by 8 GPUs resumes on 1 GPU and the other way round.

Faults: every collective runs under a timeout (``--dist-timeout``), so a rank that dies or
hangs makes the others stop with a clear :class:`DistributedError` instead of hanging forever.

CPU works too (gloo backend): ``torchrun --nproc_per_node 8`` on a 2-core laptop simulates the
8-GPU run, slowly, with exactly the same code.
"""
from __future__ import annotations

import contextlib
import functools
import gc
import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn

from .adapter import gate_values, trainable_parameters

STRATEGIES = ("none", "ddp", "fsdp")
DEFAULT_TIMEOUT_S = 600.0  # a collective waiting longer than this means a rank died or hangs
TIMEOUT_ENV = "ADAPTERLAB_DIST_TIMEOUT"


class DistributedError(RuntimeError):
    """A rank died, hung, or disagrees with the others; the message says which and what to do."""


# --------------------------------------------------------------------------- process group
@dataclass
class DistEnv:
    """Where this process stands: rank, world size, device, backend (None: a single process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: Optional[str] = None
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None


def launched_by_torchrun() -> bool:
    """True when the torchrun environment variables (RANK, WORLD_SIZE, MASTER_ADDR) are set."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR"))


def _env_int(name: str) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"environment variable {name}={value!r} is not an integer; "
                               "start the job with torchrun, which sets RANK/WORLD_SIZE/LOCAL_RANK") from None


def default_timeout() -> float:
    """Seconds a collective may wait: $ADAPTERLAB_DIST_TIMEOUT or 600."""
    value = os.environ.get(TIMEOUT_ENV)
    if value is None:
        return DEFAULT_TIMEOUT_S
    try:
        return float(value)
    except ValueError:
        raise DistributedError(f"{TIMEOUT_ENV}={value!r} is not a number of seconds") from None


def init_distributed(device: Optional[str | torch.device] = None, timeout_s: Optional[float] = None) -> DistEnv:
    """Join the process group that torchrun describes in the environment; return this rank's DistEnv.

    Without torchrun's variables this is a plain single process (no process group). On CUDA each
    rank takes GPU ``LOCAL_RANK`` and the backend is nccl; on CPU (or ``device="cpu"``) it is gloo.
    ``timeout_s`` bounds every collective: a rank that dies or hangs makes the others fail after
    at most that long (instead of waiting forever).
    """
    timeout_s = default_timeout() if timeout_s is None else float(timeout_s)
    want = torch.device(device) if device is not None else None
    use_cuda = (want.type == "cuda") if want is not None else torch.cuda.is_available()
    if use_cuda and not torch.cuda.is_available():
        raise DistributedError("device 'cuda' was asked for but torch sees no CUDA GPU; use --device cpu")

    if dist.is_available() and dist.is_initialized():  # already joined (e.g. by the caller)
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", rank))
        dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        return DistEnv(rank, world, local, dev, dist.get_backend(), timeout_s)

    if not launched_by_torchrun():
        if use_cuda:
            dev = want if want is not None and want.index is not None else torch.device("cuda", 0)
        else:
            dev = want or torch.device("cpu")
        return DistEnv(device=dev, timeout_s=timeout_s)

    if not dist.is_available():
        raise DistributedError("this torch build has no torch.distributed; run in a single process")
    rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
    local = _env_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else rank
    if use_cuda:
        n_gpus = torch.cuda.device_count()
        if local >= n_gpus:
            raise DistributedError(
                f"rank {rank} has LOCAL_RANK={local} but this machine has {n_gpus} GPU(s): start at most "
                f"{n_gpus} processes per node (torchrun --nproc_per_node {n_gpus}), or pass --device cpu"
            )
        torch.cuda.set_device(local)
        dev, backend = torch.device("cuda", local), "nccl"
        # A failed or timed-out NCCL collective tears the process down instead of hanging it.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    else:
        dev, backend = torch.device("cpu"), "gloo"
    kwargs = {"device_id": dev} if backend == "nccl" else {}
    global _TIMEOUT_S
    _TIMEOUT_S = timeout_s
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s), **kwargs)
    env = DistEnv(rank, world, local, dev, backend, timeout_s)
    barrier("start-up (every rank joined the process group)", env)
    return env


def cleanup() -> None:
    """Leave the process group (safe to call when there is none).

    Collects garbage first: a DDP/FSDP wrapper that is no longer used but waits in a reference
    cycle still holds the group, and freeing it only at interpreter exit, after the group is
    gone, can abort a process whose run had succeeded (seen with gloo: "terminate called
    without an active exception"). Callers should drop their own references to the wrapper first.
    """
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) in a process group, (0, 1) otherwise."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the one process that writes files."""
    return rank_and_world()[0] == 0


def main_only(fn: Callable) -> Callable:
    """Decorator: run ``fn`` on rank 0 only (other ranks get None). For writers of logs/plots/files."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs) if is_main() else None

    return wrapper


@main_only
def print0(*args, **kwargs) -> None:
    """print on rank 0 only."""
    print(*args, **kwargs, flush=True)


def _comm_device() -> torch.device:
    """The device collectives of the default group run on (nccl: the current GPU)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


_TIMEOUT_S: Optional[float] = None  # set by init_distributed, quoted in error messages


def _timeout_s() -> Optional[float]:
    return _TIMEOUT_S


# --------------------------------------------------------------------------- faults
_COMM_WORDS = ("gloo", "nccl", "timed out", "timeout", "connection", "peer", "socket", "broken pipe", "watchdog")


def is_comm_failure(error: BaseException) -> bool:
    """Does this exception come from a collective whose partner died or hung?"""
    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(w in text for w in _COMM_WORDS)


@contextlib.contextmanager
def collective_guard(what: str, hint: str = "") -> Iterator[None]:
    """Turn a failed/timed-out collective inside the block into a :class:`DistributedError` that
    says which rank saw it, during what, and what to do. Other errors pass through unchanged."""
    try:
        yield
    except DistributedError:
        raise
    except Exception as e:  # noqa: BLE001 - filtered just below
        rank, world = rank_and_world()
        if world == 1 or not is_comm_failure(e):
            raise
        timeout = _timeout_s()
        limit = f" (timeout {timeout:g} s)" if timeout else ""
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise DistributedError(
            f"rank {rank} of {world}: {what} failed{limit}: another rank has died or stopped responding. "
            f"Look at the other ranks' output for the first error. {hint}".rstrip()
            + f"\n  (underlying error: {first})"
        ) from e


def barrier(what: str = "barrier", env: Optional[DistEnv] = None) -> None:
    """Wait for every rank. On gloo a monitored barrier names the ranks that did not arrive."""
    rank, world = rank_and_world()
    if world == 1:
        return
    with collective_guard(f"waiting for every rank at {what}"):
        if dist.get_backend() == "gloo":
            timeout = timedelta(seconds=env.timeout_s) if env is not None else None
            dist.monitored_barrier(timeout=timeout, wait_all_ranks=True)
        else:
            dist.barrier()


def all_reduce_sum(x: float) -> float:
    """Sum a Python number over the ranks (identity in one process)."""
    if rank_and_world()[1] == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return float(t.item())


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s Python object on every rank (identity in one process)."""
    if rank_and_world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_comm_device())
    return box[0]


# --------------------------------------------------------------------------- wrapping
def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside a DDP wrapper (FSDP2 keeps the model object itself)."""
    from torch.nn.parallel import DistributedDataParallel

    while isinstance(model, DistributedDataParallel):
        model = model.module
    return model


def strategy_of(model: nn.Module) -> str:
    """"ddp", "fsdp" or "none"."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        return "ddp"
    return getattr(model, "_adapterlab_strategy", "none")


def base_fingerprint(model: nn.Module) -> torch.Tensor:
    """A cheap float64 summary of the frozen weights (a few elements of each tensor), to check
    that every rank loaded the same base without broadcasting gigabytes."""
    parts = []
    for _, p in unwrap(model).named_parameters():
        if not p.requires_grad:
            flat = p.detach().reshape(-1)
            step = max(1, flat.numel() // 64)
            parts.append(flat[::step][:64].double().sum())
    return torch.stack(parts) if parts else torch.zeros(1, dtype=torch.float64)


def _gather(t: torch.Tensor) -> list[torch.Tensor]:
    t = t.detach().to(_comm_device()).contiguous()
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [o.cpu() for o in out]


def check_same_base(model: nn.Module) -> None:
    """Raise when the ranks hold different frozen weights (e.g. different --base folders)."""
    if rank_and_world()[1] == 1:
        return
    with collective_guard("comparing the base weights across ranks"):
        prints = _gather(base_fingerprint(model))
    bad = [r for r, f in enumerate(prints) if f.shape != prints[0].shape or not torch.equal(f, prints[0])]
    if bad:
        raise DistributedError(f"ranks {bad} loaded different base weights from rank 0; every rank must load the "
                               "same --base (same folder, same dtype)")


def broadcast_trainable(model: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s trainable tensors to every rank (a fresh adapter starts identical)."""
    if rank_and_world()[1] == 1:
        return
    with collective_guard("broadcasting the initial adapter"), torch.no_grad():
        for _, p in trainable_parameters(unwrap(model)):
            buf = p.detach().to(_comm_device()).contiguous()
            dist.broadcast(buf, src=src)
            p.copy_(buf.to(p.device))


def wrap_model(model: nn.Module, strategy: str = "ddp", device: Optional[torch.device] = None,
               find_unused_parameters: bool = False) -> nn.Module:
    """Prepare ``model`` (already on its device, adapter attached) for data-parallel training.

    "none" or a single process without a process group: the model itself.
    "ddp": DistributedDataParallel. Only parameters with requires_grad enter DDP's gradient
      buckets, so each step all-reduces the adapter (1.2M values at 7B), not the base.
      The frozen base is not broadcast at start-up (each rank loaded it; a fingerprint checks).
    "fsdp": torch's ``fully_shard`` (FSDP2) on every transformer block and the root: the frozen
      base is sharded across ranks; trainable tensors are left whole (fp32) on every rank and
      their gradients are averaged by :func:`sync_gradients`, which the training loop calls
      after backward. Parameter names do not change, so checkpoints are the same as DDP's.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}; got {strategy!r}")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("the model has no trainable parameter; attach an adapter (add_adapter) before wrapping")
    rank, world = rank_and_world()
    if strategy == "none" or not dist.is_initialized():
        return model
    check_same_base(model)
    broadcast_trainable(model)
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        dev = device or next(p.device for p in model.parameters())
        if any(p.device != dev for p in model.parameters()):
            model.to(dev)
        device_ids = [dev.index] if dev.type == "cuda" else None
        with collective_guard("setting up DistributedDataParallel"):
            return DistributedDataParallel(model, device_ids=device_ids, init_sync=False,
                                           find_unused_parameters=find_unused_parameters)
    return _wrap_fsdp(model, device)


def _wrap_fsdp(model: nn.Module, device: Optional[torch.device] = None) -> nn.Module:
    """fully_shard every block, then the root. The base may still be on the CPU (a 65B base does not
    fit one GPU): each block moves to ``device`` as it is sharded, so one GPU never holds it whole."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    keep = {p for p in model.parameters() if p.requires_grad}  # adapter: whole, fp32, on every rank
    blocks = getattr(model, "layers", None)
    if blocks is None:
        raise ValueError("FSDP wrapping expects an adapterlab Llama (a model with .layers)")
    device = device or _comm_device()
    with collective_guard("sharding the base with FSDP"):
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        for block in blocks:
            fully_shard(block, mesh=mesh, ignored_params=keep)
        fully_shard(model, mesh=mesh, ignored_params=keep)
    with torch.no_grad():
        for p in keep:  # FSDP leaves ignored tensors where they are
            p.data = p.data.to(device)
    model._adapterlab_strategy = "fsdp"
    return model


def sync_gradients(model: nn.Module) -> None:
    """Average the gradients of trainable tensors that no wrapper reduced (FSDP's ignored ones).

    DDP and a single process need nothing (no-op). One flat all-reduce, in a fixed order."""
    if strategy_of(model) != "fsdp" or rank_and_world()[1] == 1:
        return
    params = [p for _, p in trainable_parameters(unwrap(model))]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads]).to(_comm_device())
    with collective_guard("averaging adapter gradients"):
        dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(p).to(p.device, p.dtype)
        offset += n


def no_sync(model: nn.Module, skip: bool = True):
    """Inside: DDP accumulates gradients locally without all-reducing (all micro-batches but the
    last). A null context for other strategies or when ``skip`` is False."""
    if skip and strategy_of(model) == "ddp":
        return model.no_sync()
    return contextlib.nullcontext()


def reduced_elements(model: nn.Module) -> dict:
    """What a data-parallel step all-reduces: {tensors, elements, bytes, buckets}.

    For DDP it reads DDP's own record of its gradient buckets, so a test can check that the
    frozen base is not in them. For FSDP it counts what :func:`sync_gradients` reduces.
    """
    params = [p for _, p in trainable_parameters(unwrap(model))]
    counted = {"tensors": len(params), "elements": sum(p.numel() for p in params),
               "bytes": sum(p.numel() * p.element_size() for p in params), "buckets": None}
    if strategy_of(model) == "ddp":
        try:
            info = model._get_ddp_logging_data()  # torch's record of the reducer's buckets
            buckets = [int(b) for b in str(info.get("bucket_sizes", "")).split(",") if b.strip()]
            counted.update(tensors=int(info["num_parameter_tensors"]), bytes=int(info["total_parameter_size_bytes"]),
                           buckets=buckets)
            counted["elements"] = counted["bytes"] // 4 if info.get("dtypes") == "float" else counted["elements"]
        except Exception:  # private API; fall back to counting
            pass
    return counted


# --------------------------------------------------------------------------- debug check
def check_replicas(model: nn.Module, step: Optional[int] = None) -> None:
    """Debug: raise :class:`DistributedError` unless every rank holds the same adapter.

    Gathers the effective gate values (bit for bit) and a float64 checksum of every trainable
    tensor from all ranks. Data parallelism keeps replicas identical by construction (same
    averaged gradient, same optimizer step); a difference means a bug (e.g. a gradient that
    was not reduced, or ranks that loaded different weights).
    """
    rank, world = rank_and_world()
    if world == 1:
        return
    inner = unwrap(model)
    gates = gate_values(inner).reshape(-1).double()  # (L*H,)
    trained = trainable_parameters(inner)
    sums = torch.stack([p.detach().double().sum() for _, p in trained]) if trained else gates[:0]
    local = torch.cat([gates, sums])
    with collective_guard("checking adapter replicas"):
        everyone = _gather(local)
    where = f" after step {step}" if step is not None else ""
    for r, other in enumerate(everyone):
        if not torch.equal(other, everyone[0]):
            n_g = gates.numel()
            dg = (other[:n_g] - everyone[0][:n_g]).abs()
            H = inner.config.n_heads if hasattr(inner, "config") else 1
            worst = int(dg.argmax()) if n_g else 0
            raise DistributedError(
                f"adapter replicas differ{where}: rank {r} vs rank 0, max gate difference {float(dg.max()) if n_g else 0:.3g} "
                f"(adapted layer #{worst // H}, head {worst % H}); trainable-tensor checksums "
                f"{'differ' if not torch.equal(other[n_g:], everyone[0][n_g:]) else 'agree'}. "
                "The gradients are not being averaged across ranks (or ranks started from different weights)."
            )


__all__ = [
    "STRATEGIES", "DistEnv", "DistributedError", "init_distributed", "cleanup", "rank_and_world",
    "is_main", "main_only", "print0", "barrier", "collective_guard", "is_comm_failure", "all_reduce_sum",
    "broadcast_object", "unwrap",
    "strategy_of", "wrap_model", "sync_gradients", "no_sync", "reduced_elements", "check_replicas",
    "check_same_base", "broadcast_trainable", "base_fingerprint", "launched_by_torchrun", "default_timeout",
]
