"""Timing: interleaved providers, cache flush between calls, median and 20/80 percentiles, peak memory.

On CUDA each call is bracketed by CUDA events (the method of triton.testing.do_bench, with the providers of a case
interleaved call by call so clock and thermal drift hit all of them alike, in a new order each round, drawn from a
fixed seed: a provider that always ran first, or always after a given other, would carry that position's cost in
every sample); a 256 MB buffer is zeroed before every call so no provider finds its operands in L2. On CPU the same
loop uses time.perf_counter and a smaller flush buffer. Gradients are reset to None outside the timed region, as
do_bench's grad_to_none does.
"""
from __future__ import annotations

import math
import random
import statistics
import time
import weakref
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ..ops import rng

CUDA_FLUSH_BYTES = 256 * 1024 * 1024
CPU_FLUSH_BYTES = 4 * 1024 * 1024


def quantiles(samples_ms: Sequence[float]) -> Dict[str, float]:
    """Median and the 20th / 80th percentiles (linear interpolation, as torch.quantile)."""
    s = sorted(samples_ms)
    if not s:
        return {"ms_median": math.nan, "ms_p20": math.nan, "ms_p80": math.nan}

    def q(f: float) -> float:
        pos = f * (len(s) - 1)
        lo = int(math.floor(pos))
        hi = min(lo + 1, len(s) - 1)
        return s[lo] + (s[hi] - s[lo]) * (pos - lo)

    return {"ms_median": statistics.median(s), "ms_p20": q(0.2), "ms_p80": q(0.8)}


# Fewer rounds than this give no 95 % interval from order statistics (the binomial tail needs n >= 6).
PAIRED_MIN_ROUNDS = 6


def paired_ratio(num_ms: Sequence[float], den_ms: Sequence[float]) -> Optional[Dict[str, float]]:
    """Two providers timed in the same rounds (sample i of each from round i): the median over rounds of
    num_i / den_i, and a distribution-free 95 % interval for that median (the order statistics k and n + 1 - k of
    the n ratios, k = floor(n / 2 - 0.98 sqrt(n)): the normal approximation of the sign test). A slow stretch of the
    machine raises both calls of a round, so the per-round ratio cancels what the two medians each carry; on a noisy
    CPU this interval is a fraction of the p20-p80 spread. None for fewer than PAIRED_MIN_ROUNDS rounds, lists of
    different lengths (not paired), or a time that is not positive."""
    n = len(num_ms)
    if n < PAIRED_MIN_ROUNDS or len(den_ms) != n or min(den_ms) <= 0 or min(num_ms) <= 0:
        return None
    r = sorted(a / b for a, b in zip(num_ms, den_ms))
    k = max(1, int(math.floor(n / 2 - 0.98 * math.sqrt(n))))
    return {"ratio": statistics.median(r), "lo": r[k - 1], "hi": r[n - k]}


ORDER_SEED = 20261201


def _round_orders(n: int, reps: int) -> List[List[int]]:
    """reps permutations of range(n), from a generator of its own with a fixed seed (torch's and Python's global
    generators are left alone)."""
    rnd = random.Random(ORDER_SEED)
    orders = []
    for _ in range(reps):
        order = list(range(n))
        rnd.shuffle(order)
        orders.append(order)
    return orders


class Timer:
    """Times zero-argument callables on one device. `prepare` (untimed) runs before each timed call."""

    def __init__(self, device: torch.device, flush: bool = True):
        self.device = device
        self.is_cuda = device.type == "cuda"
        nbytes = CUDA_FLUSH_BYTES if self.is_cuda else CPU_FLUSH_BYTES
        self.flush_buf = torch.empty(nbytes // 4, dtype=torch.int32, device=device) if flush else None
        self.method = (
            ("CUDA events" if self.is_cuda else "time.perf_counter")
            + (f", {nbytes >> 20} MB cache flush before every call" if flush else ", no cache flush")
            + ", providers interleaved call by call in a seeded random order each round"
        )

    def sync(self) -> None:
        if self.is_cuda:
            torch.cuda.synchronize(self.device)

    def _flush(self) -> None:
        if self.flush_buf is not None:
            self.flush_buf.zero_()

    def estimate_ms(self, fn: Callable[[], object], prepare: Optional[Callable[[], None]] = None, n: int = 3) -> float:
        """A rough per-call time (ms), used to pick the number of repetitions."""
        best = math.inf
        for _ in range(n):
            if prepare is not None:
                prepare()
            self.sync()
            t0 = time.perf_counter()
            fn()
            self.sync()
            best = min(best, (time.perf_counter() - t0) * 1e3)
        return best

    def run_interleaved(
        self,
        fns: Sequence[Callable[[], object]],
        prepares: Sequence[Optional[Callable[[], None]]],
        reps: int,
    ) -> List[List[float]]:
        """reps timed calls of each fn: rounds of one call each, in an order shuffled every round (the same orders in
        every run: the generator's seed is fixed); per-call times in ms, in the order of fns."""
        out: List[List[float]] = [[] for _ in fns]
        rounds = _round_orders(len(fns), reps)
        if self.is_cuda:
            events = [[(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                       for _ in range(reps)] for _ in fns]
            for i in range(reps):
                for j in rounds[i]:
                    fn, prep = fns[j], prepares[j]
                    if prep is not None:
                        prep()
                    self._flush()
                    start, end = events[j][i]
                    start.record()
                    fn()
                    end.record()
            torch.cuda.synchronize(self.device)
            for j in range(len(fns)):
                out[j] = [s.elapsed_time(e) for s, e in events[j]]
            return out
        for order in rounds:
            for j in order:
                fn, prep = fns[j], prepares[j]
                if prep is not None:
                    prep()
                self._flush()
                t0 = time.perf_counter()
                fn()
                out[j].append((time.perf_counter() - t0) * 1e3)
        return out

    def peak_memory_mb(self, fn: Callable[[], object], prepare: Optional[Callable[[], None]] = None) -> float:
        """Peak memory (MB) while one call runs, counting everything allocated at that moment (inputs, parameters,
        saved activations, outputs) except the flush buffer.

        CUDA: torch.cuda.max_memory_allocated. CPU: the peak of live tensor storage bytes seen by a dispatch mode
        (tensors alive before the call are counted once up front); it misses scratch memory inside single kernels,
        so it is an estimate."""
        if prepare is not None:
            prepare()
        if self.is_cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            fn()
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            if self.flush_buf is not None:
                peak -= self.flush_buf.numel() * self.flush_buf.element_size()
            return peak / 2**20
        tracker = LiveTensorBytes()
        with rng.kernels_run_by(_run_outside_modes), tracker:
            fn()
        return tracker.peak / 2**20


def _run_outside_modes(name, eager, args):
    """Runs the torch backend's dropout-mask kernels compiled, as they run when timed: torch.compile refuses to run
    under a TorchDispatchMode such as LiveTensorBytes, and their eager form would add temporaries the real run does not
    have. The tracker still sees their results when the next op reads them."""
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes():
        return rng.run_fused(name, args)


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of tensor storage created during the `with` block plus the storages of tensors that ops read
    (the pre-existing inputs), on CPU where torch has no allocator statistics. Storage lifetime is followed through
    the first tensor seen holding it, so a storage kept alive only by a later view is released early: an estimate."""

    def __init__(self):
        super().__init__()
        self.live: Dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _release(self, key: int) -> None:
        nbytes = self.live.pop(key, None)
        if nbytes is not None:
            self.current -= nbytes

    def _track(self, t: torch.Tensor) -> None:
        try:
            st = t.untyped_storage()
            key = st.data_ptr()
            nbytes = st.nbytes()
        except (RuntimeError, NotImplementedError):
            return
        if key == 0 or key in self.live:
            return
        self.live[key] = nbytes
        self.current += nbytes
        self.peak = max(self.peak, self.current)
        weakref.finalize(t, self._release, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for t in tree_flatten((args, kwargs))[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out
