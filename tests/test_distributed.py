"""Scale-out: KasaLinear under DistributedDataParallel and FSDP2 (fully_shard), CPU + gloo, 2 processes.

Each rank is a subprocess of tests/_dist_worker.py with torchrun's environment variables, on a free port, under a
hard timeout so a hang fails the test instead of blocking CI. The ranks split one global batch; their step-0
gradients and their adapters after 3 SGD steps (task loss + kasa_regularizer) must equal a single-process run on the
whole batch. Dropout is off: the shared dropout hash indexes elements of each rank's local batch, so masks of a
split batch differ from the single-process mask by construction.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import kasa_kernels as kk

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _dist_worker as worker  # noqa: E402

WORLD = 2
TIMEOUT_S = 150

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(mode: str, tmp_path: Path):
    port = _free_port()
    procs = []
    for rank in range(WORLD):
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(WORLD),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
        )
        log = open(tmp_path / f"log{rank}.txt", "w")
        procs.append(
            (subprocess.Popen([sys.executable, str(HERE / "_dist_worker.py"), mode, str(tmp_path)], env=env,
                              stdout=log, stderr=subprocess.STDOUT), log)
        )
    codes = []
    try:
        for p, _ in procs:
            codes.append(p.wait(timeout=TIMEOUT_S))
    except subprocess.TimeoutExpired:
        codes.append("timeout")
    finally:
        for p, log in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            log.close()
    logs = "\n".join(f"--- rank {r} ---\n" + (tmp_path / f"log{r}.txt").read_text()[-4000:] for r in range(WORLD))
    assert codes == [0] * WORLD, f"{mode}: rank exit codes {codes}\n{logs}"
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def reference():
    return worker.train_reference()


def _assert_close_dicts(got, want, what):
    assert set(got) == set(want), f"{what}: parameter names {sorted(got)} != {sorted(want)}"
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-6, msg=lambda m: f"{what} {n}: {m}")


def test_reference_run_is_not_trivial(reference):
    # Every adapter gets a gradient and moves; otherwise equality with the ranks would prove nothing.
    grads, final = reference
    init = {n: p.detach() for n, p in worker.build_model().named_parameters() if p.requires_grad}
    assert len(grads) == 6
    for n in grads:
        assert grads[n].abs().max() > 1e-3, n
        assert (final[n] - init[n]).abs().max() > 1e-4, n


def test_ddp_matches_single_process(tmp_path, reference):
    grads, final = reference
    for rank, out in enumerate(_launch("ddp", tmp_path)):
        _assert_close_dicts(out["grads"], grads, f"DDP rank {rank} step-0 grad")
        _assert_close_dicts(out["final"], final, f"DDP rank {rank} adapter after {worker.STEPS} steps")


# FSDP2 on CPU with gloo (torch 2.14): fully_shard shards every parameter; kasa_regularizer runs on the resharded
# DTensor parameters after forward (it all-gathers them differentiably).


def test_fsdp2_matches_single_process(tmp_path, reference):
    grads, final = reference
    for rank, out in enumerate(_launch("fsdp2", tmp_path)):
        assert all(out["sharded"].values()), f"fully_shard left parameters unsharded: {out['sharded']}"
        _assert_close_dicts(out["grads"], grads, f"FSDP2 rank {rank} step-0 grad")
        _assert_close_dicts(out["final"], final, f"FSDP2 rank {rank} adapter after {worker.STEPS} steps")


def test_fsdp2_regularizer_on_dtensor_parameters(tmp_path):
    model = worker.build_model()
    adapters = {n: p for n, p in model.named_parameters() if p.requires_grad}
    want = {}
    for form in ("paper", "official"):
        for p in adapters.values():
            p.grad = None
        reg = kk.kasa_regularizer(model, beta=worker.BETA, gamma=worker.GAMMA, form=form)
        reg.backward()
        want[form] = (reg.detach(), {n: p.grad.clone() for n, p in adapters.items()})
    for rank, out in enumerate(_launch("fsdp2_reg", tmp_path)):
        assert all(out["is_dtensor"].values()), f"rank {rank}: adapters not sharded: {out['is_dtensor']}"
        # r = 3 rows over 2 ranks: shards of 2 and 1 rows; the test covers uneven sharding.
        assert out["local_shapes"]["up.lora_A"][0] < worker.R
        assert out["error"] is None, f"rank {rank}: kasa_regularizer on FSDP2 DTensor parameters raised {out['error']}"
        for form, (value, grads) in want.items():
            torch.testing.assert_close(out[form]["value"], value, rtol=1e-6, atol=1e-7)
            _assert_close_dicts(out[form]["grads"], grads, f"rank {rank} {form} regularizer grad")
