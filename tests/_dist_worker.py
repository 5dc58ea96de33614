"""One rank of the scale-out tests (tests/test_distributed.py): run as a subprocess with RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT set, as torchrun would. Writes what it observed to <out>/rank<R>.pt.

Also importable: build_model / global_batch / train_reference give the single-process run the ranks must match.

    python tests/_dist_worker.py {ddp|fsdp2|fsdp2_reg} OUT_DIR
"""
from __future__ import annotations

import datetime
import os
import sys

import torch
import torch.nn as nn

import kasa_kernels as kk

K, HIDDEN, N, R = 12, 10, 7, 3
GLOBAL_BATCH = 8
STEPS = 3
LR = 0.05
BETA, GAMMA = 1e-2, 1e-1  # larger than the defaults so the regularizer visibly moves the adapters


def build_model() -> nn.Module:
    """Two KasaLinear layers. The SVD truncation (inject -> from_linear) runs here, before any wrapping, on the
    full weight: every rank builds the same model from the same seed."""
    g = torch.Generator().manual_seed(1234)
    torch.manual_seed(1234)
    model = nn.Sequential()
    model.add_module("up", nn.Linear(K, HIDDEN))
    model.add_module("act", nn.Tanh())
    model.add_module("down", nn.Linear(HIDDEN, N))
    kk.inject(model, target_modules=["up", "down"], r=R, alpha=2 * R, backend="torch")
    # B = 0 at init makes dA and dd exactly zero on step 0; give B values so every adapter gradient is exercised.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, kk.KasaLinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.3)
    return model


def global_batch(step: int):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(GLOBAL_BATCH, K, generator=g), torch.randn(GLOBAL_BATCH, N, generator=g)


def loss_fn(model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return ((model(x) - t) ** 2).mean() + kk.kasa_regularizer(model, beta=BETA, gamma=GAMMA)


def adapter_names(model: nn.Module):
    return [n for n, p in model.named_parameters() if p.requires_grad]


def train_reference():
    """Single process, whole global batch: the gradients of step 0 and the adapters after STEPS SGD steps."""
    model = build_model()
    params = dict((n, p) for n, p in model.named_parameters() if p.requires_grad)
    opt = torch.optim.SGD(params.values(), lr=LR)
    first_grads = None
    for step in range(STEPS):
        x, t = global_batch(step)
        opt.zero_grad()
        loss_fn(model, x, t).backward()
        if first_grads is None:
            first_grads = {n: p.grad.detach().clone() for n, p in params.items()}
        opt.step()
    final = {n: p.detach().clone() for n, p in params.items()}
    return first_grads, final


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _train(model: nn.Module, rank: int, world: int):
    params = dict((n, p) for n, p in model.named_parameters() if p.requires_grad)
    opt = torch.optim.SGD(params.values(), lr=LR)
    per_rank = GLOBAL_BATCH // world
    first_grads = None
    for step in range(STEPS):
        x, t = global_batch(step)
        x, t = x[rank * per_rank : (rank + 1) * per_rank], t[rank * per_rank : (rank + 1) * per_rank]
        opt.zero_grad()
        loss_fn(model, x, t).backward()
        if first_grads is None:
            first_grads = {n: _full(p.grad).detach().clone() for n, p in params.items()}
        opt.step()
    final = {n: _full(p).detach().clone() for n, p in params.items()}
    return first_grads, final


def run_ddp(rank: int, world: int):
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(build_model())
    grads, final = _train(model, rank, world)
    strip = lambda d: {n.removeprefix("module."): v for n, v in d.items()}  # noqa: E731
    return {"grads": strip(grads), "final": strip(final)}


def _fully_shard(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for m in model.modules():
        if isinstance(m, kk.KasaLinear):
            fully_shard(m)
    fully_shard(model)
    return model


def run_fsdp2(rank: int, world: int):
    from torch.distributed.tensor import DTensor

    model = _fully_shard(build_model())
    sharded = {n: isinstance(p, DTensor) for n, p in model.named_parameters()}
    grads, final = _train(model, rank, world)
    return {"grads": grads, "final": final, "sharded": sharded}


def run_fsdp2_reg(rank: int, world: int):
    """kasa_regularizer on the DTensor parameters of an FSDP2 model, outside forward (the parameters stay sharded):
    value and gradients against the same model unsharded."""
    from torch.distributed.tensor import DTensor

    model = _fully_shard(build_model())
    adapters = dict((n, p) for n, p in model.named_parameters() if p.requires_grad)
    out = {"is_dtensor": {n: isinstance(p, DTensor) for n, p in adapters.items()}}
    out["local_shapes"] = {n: tuple(p.to_local().shape) if isinstance(p, DTensor) else None for n, p in adapters.items()}
    out["error"] = None
    try:
        for form in ("paper", "official"):
            for p in adapters.values():
                p.grad = None
            reg = kk.kasa_regularizer(model, beta=BETA, gamma=GAMMA, form=form)
            reg.backward()
            out[form] = {
                "value": _full(reg).detach().clone(),
                "grads": {n: _full(p.grad).detach().clone() for n, p in adapters.items()},
            }
    except Exception as e:  # reported to the test, which prints it
        out["error"] = f"{type(e).__name__}: {e}"
    return out


def main() -> None:
    mode, out_dir = sys.argv[1], sys.argv[2]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        result = {"ddp": run_ddp, "fsdp2": run_fsdp2, "fsdp2_reg": run_fsdp2_reg}[mode](rank, world)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
