"""`kasa-bench report FILE [FILE ...]`: markdown ratio tables and PNG plots; several devices side by side.

Ratios are taken within one results file (one device, one run, providers interleaved), never across files; across
devices the report puts each device's own ratios next to each other (the A100-vs-RTX-3090 use case).
    fwd / T_mm      = provider forward / cublas_linear forward
    full / T_frozen = provider forward+backward / frozen_linear forward+backward
    speedup vs peer = peer full time / ours full time (> 1: ours faster)
    [lo-hi] beside it = 95 % interval of peer / ours taken round by round (each round times every provider once,
                        so a slow stretch of the machine hits both; bench.timing.paired_ratio)
"""
from __future__ import annotations

import json
import math
import os
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

from .providers import BASELINES, FUSED, GEMMS, OURS, PEERS, PROVIDERS
from .shapes import P

CaseKey = Tuple[int, int, int, int, float, str]


def _is_traffic(path: str) -> bool:
    with open(path) as f:
        return json.load(f).get("kind") == "traffic"


def load(path: str) -> Dict:
    with open(path) as f:
        data = json.load(f)
    for field in ("device", "rows", "date"):
        if field not in data:
            raise ValueError(f"{path}: not a kasa-bench results file (no {field!r} field)")
    data["_path"] = path
    return data


def _key(row: Dict) -> CaseKey:
    return (row["M"], row["K"], row["N"], row["r"], float(row["dropout"]), row["dtype"])


def _case_str(k: CaseKey) -> str:
    m, kk, n, r, p, dt = k
    return f"M={m} K={kk} N={n} r={r} p={p:g} {dt}"


class Table:
    """ms_median lookup: (case, provider, mode) -> row, for one results file."""

    def __init__(self, data: Dict):
        self.data = data
        self.rows: Dict[Tuple[CaseKey, str, str], Dict] = {}
        self.cases: "OrderedDict[CaseKey, str]" = OrderedDict()
        for r in data["rows"]:
            self.rows[(_key(r), r["provider"], r["mode"])] = r
            self.cases.setdefault(_key(r), r.get("tag", ""))
        # (case, provider) -> that provider's entry in the traffic count of the case (bench/traffic.py)
        self.traffic: Dict[Tuple[CaseKey, str], Dict] = {
            (_key(e), name): entry for e in data.get("traffic", []) for name, entry in e["providers"].items()}

    def ms(self, case: CaseKey, provider: str, mode: str) -> Optional[float]:
        r = self.rows.get((case, provider, mode))
        return None if r is None else r["ms_median"]

    def row(self, case, provider, mode) -> Optional[Dict]:
        return self.rows.get((case, provider, mode))

    def passes(self, case, provider) -> str:
        """Activation passes of one forward + backward (or forward only) of `provider` at `case`, as a cell."""
        entry = self.traffic.get((case, provider))
        if entry is None:
            return "-"
        if entry["status"] == "counted":
            return f"{entry['passes']['total']:.2f}"
        return "opaque" if entry["status"] == "opaque" else "-"

    def providers(self) -> List[str]:
        present = {p for (_, p, _) in self.rows}
        return [p for p in PROVIDERS if p in present]

    def ratio(self, case, num: str, num_mode: str, den: str, den_mode: str) -> Optional[float]:
        a, b = self.ms(case, num, num_mode), self.ms(case, den, den_mode)
        if a is None or b is None or b <= 0:
            return None
        return a / b

    def paired_speedup(self, case, peer: str, ours: str, mode: str = "full") -> Optional[Tuple[float, float, float]]:
        """peer / ours from the rounds both were timed in (run.py's "paired": the median per-round ratio and its 95 %
        interval, inverted), or None where the file has no such entry (files made before it existed)."""
        row = self.row(case, ours, mode)
        pr = None if row is None else (row.get("paired") or {}).get(peer)
        if not pr or not all(isinstance(pr.get(k), (int, float)) and math.isfinite(pr[k]) and pr[k] > 0
                             for k in ("ratio", "lo", "hi")):
            return None
        return 1.0 / pr["ratio"], 1.0 / pr["hi"], 1.0 / pr["lo"]

    def fastest(self, case, providers: Sequence[str], mode: str = "full") -> Optional[str]:
        """The fastest of `providers` timed for this case in `mode` (ties: the first by name)."""
        cands = [(self.ms(case, p, mode), p) for p in providers if self.ms(case, p, mode) is not None]
        return min(cands)[1] if cands else None

    def best_fused(self, case, mode: str = "full") -> Optional[str]:
        return self.fastest(case, FUSED, mode)

    def ours(self, case, mode: str = "full") -> Optional[str]:
        """The fastest of our providers present for this case: a fused backend, else the torch backend."""
        return self.fastest(case, OURS, mode)

    def headline_case(self) -> Tuple[Optional[CaseKey], bool]:
        p = _p_key()
        if p in self.cases:
            return p, True
        if not self.cases:
            return None, False
        return max(self.cases, key=lambda k: (k[0] * k[1] * k[2], -k[4])), False


def _f(v: Optional[float], fmt: str = "{:.3f}") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return fmt.format(v)


def _ms_range(row: Dict, fmt: str = "{:.3f}") -> str:
    """median (p20-p80) in ms."""
    return f"{fmt.format(row['ms_median'])} ({fmt.format(row['ms_p20'])}-{fmt.format(row['ms_p80'])})"


def _label(data: Dict) -> str:
    return f"{data['device']} ({os.path.basename(data['_path'])})"


def _short(data: Dict) -> str:
    return data.get("device_slug") or data["device"]


# ----------------------------------------------------------------------------------------------------------------
# Targets (docs/design.md, "Performance targets"): evaluated only where the data exists


Target = Tuple[str, str, str, str, str, str]  # (metric, must, target, value, must verdict, target verdict)


def _p_key(dropout: float = 0.0) -> CaseKey:
    """Shape P at bf16, the setting of docs/design.md's targets."""
    return (P["M"], P["K"], P["N"], P["r"], dropout, "bf16")


def _judge(v: Optional[float], must: float, target: float, le: bool) -> Tuple[str, str, str]:
    """(value, must verdict, target verdict); le: lower is better."""
    if v is None:
        return "-", "no data", "no data"
    ok = (lambda x, b: x <= b) if le else (lambda x, b: x >= b)
    return f"{v:.3f}", "PASS" if ok(v, must) else "FAIL", "PASS" if ok(v, target) else "FAIL"


def _no_data(metric: str, must: str, target: str, why: str = "no data") -> Target:
    return (metric, must, target, "-", why, why)


def _fused_ratio(t: Table, case: CaseKey, den: str, den_mode: str, mode: str,
                 invert: bool = False) -> Tuple[Optional[float], Optional[str]]:
    """(best fused provider's time / den's, or den's / fused with invert; that provider)."""
    f = t.best_fused(case, mode)
    if f is None:
        return None, None
    r = t.ratio(case, den, den_mode, f, mode) if invert else t.ratio(case, f, mode, den, den_mode)
    return r, f


# (metric, dropout at P, reference provider, its mode, the fused mode, reference / fused (else fused / reference),
#  must, target, lower is better)
_RATIO_TARGETS = (
    ("fused forward / T_mm at P", 0.0, "cublas_linear", "forward", "forward", False, 1.12, 1.05, True),
    ("fused fwd+bwd / T_frozen at P", 0.0, "frozen_linear", "full", "full", False, 1.15, 1.08, True),
    ("T_eager / fused, fwd+bwd, P, p=0", 0.0, "peft", "full", "full", True, 1.25, 1.35, False),
    ("T_eager / fused, fwd+bwd, P, p=0.1", 0.1, "peft", "full", "full", True, 1.35, 1.50, False),
    ("T_compile / fused, fwd+bwd, P", 0.0, "torch_compile", "full", "full", True, 1.10, 1.20, False),
)


def _ratio_rows(t: Table) -> List[Target]:
    """The best fused backend at P against T_mm, T_frozen, PEFT and torch.compile."""
    out = []
    for name, p, den, den_mode, mode, inv, must, target, le in _RATIO_TARGETS:
        v, f = _fused_ratio(t, _p_key(p), den, den_mode, mode, inv)
        val, m, tg = _judge(v, must, target, le)
        cmp = "<=" if le else ">="
        out.append((name + (f" [{f}]" if f else ""), f"{cmp} {must}", f"{cmp} {target}", val, m, tg))
    return out


def _gemm_rows(t: Table) -> List[Target]:
    """Each of our GEMMs with the adapter off against cuBLAS at P; the same flops on both sides, so the TFLOP/s ratio
    is T_mm / T_gemm."""
    metric = "our GEMM with the adapter off vs cuBLAS (TFLOP/s)"
    gemms = [(g, t.ratio(_p_key(), "cublas_linear", "forward", g, "forward")) for g in GEMMS]
    gemms = [(g, v) for g, v in gemms if v is not None]
    if not gemms:
        return [_no_data(metric, ">= 0.90", ">= 1.00", "not measured")]
    return [(f"{metric} [{g}]", ">= 0.90", ">= 1.00") + _judge(v, 0.90, 1.00, False) for g, v in gemms]


def _decode_row(t: Table) -> Target:
    """The worst fused forward / T_mm over decode sizes (M <= 64) at bf16, p = 0."""
    worst, wf = None, None
    for case in t.cases:
        if case[0] <= 64 and case[5] == "bf16" and case[4] == 0.0:
            v, f = _fused_ratio(t, case, "cublas_linear", "forward", "forward")
            if v is not None and (worst is None or v > worst):
                worst, wf = v, f
    return ("decode M <= 64: fused forward / T_mm (worst)" + (f" [{wf}]" if wf else ""), "<= 1.3", "<= 1.1") + \
        _judge(worst, 1.30, 1.10, True)


def _regularizer_row(t: Table) -> Target:
    """The whole-model regularizer: PEFT's time over our fastest."""
    metric = "whole-model regularizer PEFT / ours, 32 layers"
    reg = _whole_model_rows(t.data, "regularizer")
    peft = _peft_of(reg)
    ours = [(w["ms_median"], w["provider"]) for w in reg if w["provider"].startswith("kasa_kernels")]
    if peft is None or not ours:
        return _no_data(metric, ">= 10", ">= 30")
    peft_ms = peft["ms_median"]
    best_ms, best_name = min(ours)
    width = next(w["hidden"] for w in reg)
    note = f" [{best_name}, hidden {width}{', small widths: not the target setting' if width < 4096 else ''}]"
    return (metric + note, ">= 10", ">= 30") + _judge(peft_ms / best_ms, 10.0, 30.0, False)


def _memory_row(t: Table) -> Target:
    """Peak memory of the best fused fwd+bwd at P beyond T_frozen's, against H plus the adapters and their grads."""
    pk = _p_key()
    f = t.best_fused(pk, "full")
    rf, rz = (t.row(pk, f, "full") if f else None), t.row(pk, "frozen_linear", "full")
    if not (rf and rz and rf.get("peak_mem_mb") is not None and rz.get("peak_mem_mb") is not None):
        return _no_data("peak memory fwd+bwd minus T_frozen's at P (MB)", "<= 2Mr4 B + params", "same")
    extra = rf["peak_mem_mb"] - rz["peak_mem_mb"]
    a = 4  # fp32 adapters at bf16
    bound = (2 * P["M"] * P["r"] * 4 + 2 * a * P["r"] * (P["K"] + P["N"] + 1)) / 2**20
    ok = "PASS" if extra <= bound else "FAIL"
    return (f"peak memory fwd+bwd minus T_frozen's at P [{f}] (MB)", f"<= {bound:.2f}", f"<= {bound:.2f}",
            f"{extra:.2f}", ok, ok)


def _never_slower_row(t: Table) -> Target:
    """The best fused backend against the torch backend, fwd+bwd, at every case with both."""
    checked, slower = 0, []
    for case in t.cases:
        f = t.best_fused(case, "full")
        te = t.ms(case, "torch_eager", "full")
        if f and te:
            checked += 1
            if t.ms(case, f, "full") > te:
                slower.append(_case_str(case))
    if not checked:
        return _no_data("fused never slower than torch backend (full)", "0 slower", "0 slower")
    verdict = "PASS" if not slower else "FAIL"
    return (f"fused never slower than torch backend (full, {checked} shapes)", "0 slower", "0 slower",
            f"{len(slower)} slower", verdict, verdict)


def targets(t: Table) -> List[Target]:
    """(metric, must, target, value, must verdict, target verdict) rows."""
    return _ratio_rows(t) + _gemm_rows(t) + [_decode_row(t), _regularizer_row(t), _memory_row(t),
                                             _never_slower_row(t)]


# ----------------------------------------------------------------------------------------------------------------
# Markdown


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> List[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out + [""]


def _case_table(t: Table, case: CaseKey) -> List[str]:
    hdr = ["provider", "fwd ms", "bwd ms", "full ms (p20-p80)", "fwd / T_mm", "full / T_frozen", "full TFLOP/s",
           "full GB/s", "peak MB (full)", "passes"]
    rows = []
    for p in t.providers():
        if not any(t.row(case, p, m) for m in ("forward", "backward", "full")):
            continue
        full = t.row(case, p, "full")
        fwd = t.row(case, p, "forward")
        rng = _ms_range(full) if full else "-"
        peak = (full or fwd or {}).get("peak_mem_mb")
        rows.append([
            p, _f(t.ms(case, p, "forward")), _f(t.ms(case, p, "backward")), rng,
            _f(t.ratio(case, p, "forward", "cublas_linear", "forward")),
            _f(t.ratio(case, p, "full", "frozen_linear", "full")),
            _f((full or fwd or {}).get("tflops"), "{:.2f}"), _f((full or fwd or {}).get("gbps"), "{:.1f}"),
            _f(peak, "{:.1f}"), t.passes(case, p),
        ])
    return _md_table(hdr, rows)


def _peer_table(t: Table) -> List[str]:
    """Speedup of ours over each peer, forward+backward, every case."""
    hdr = ["case", "ours"] + [f"vs {p}" for p in PEERS] + ["vs frozen_linear (T_frozen)"]
    rows = []
    for case, tag in t.cases.items():
        o = t.ours(case, "full")
        if o is None:
            continue
        cells = []
        for p in PEERS:
            cell = "-" if p == o else _f(t.ratio(case, p, "full", o, "full"), "{:.2f}x")
            paired = None if p == o else t.paired_speedup(case, p, o)
            if paired is not None and cell != "-":
                cell += " [{:.3f}-{:.3f}]".format(*paired[1:])
            cells.append(cell)
        cells.append(_f(t.ratio(case, "frozen_linear", "full", o, "full"), "{:.2f}x"))
        rows.append([_case_str(case) + (f" [{tag}]" if tag else ""), o] + cells)
    return _md_table(hdr, rows)


def _whole_model_rows(data: Dict, kind: str) -> List[Dict]:
    """The whole-model results of one kind ("regularizer", "train_step") that ran (errors have no provider)."""
    return [w for w in data.get("whole_model", []) if w.get("kind") == kind and w.get("provider")]


def _peft_of(rows: List[Dict]) -> Optional[Dict]:
    return next((w for w in rows if w["provider"] == "peft"), None)


def _whole_model(data: Dict) -> List[str]:
    out = []
    reg = _whole_model_rows(data, "regularizer")
    if reg:
        w0 = reg[0]
        peft = _peft_of(reg)
        out.append(f"Regularizer loss + backward, {w0['layers']} layers x {w0['targets_per_layer']} targets, hidden "
                   f"{w0['hidden']}, MLP {w0['mlp']}, r {w0['r']}:")
        out.append("")
        out += _md_table(["provider", "ms median (p20-p80)", "PEFT / this", "loss rel. diff vs PEFT", "extra MB"], [
            [w["provider"], _ms_range(w),
             _f(peft["ms_median"] / w["ms_median"] if peft else None, "{:.1f}x"),
             _f(w.get("loss_rel_diff_vs_peft"), "{:.1e}"), _f(w.get("peak_mem_mb"), "{:.2f}")] for w in reg])
    tr = _whole_model_rows(data, "train_step")
    if tr:
        w0 = tr[0]
        peft = _peft_of(tr)
        out.append(f"Training step of {w0['model']} (hidden {w0['hidden']}, MLP {w0['mlp']}, {w0['layers']} layers, "
                   f"vocab {w0['vocab']}, {w0['dtype']}), {w0['batch']}x{w0['seq']} tokens, r {w0['r']} on "
                   f"{', '.join(w0['targets'])}; forward + regularizer + backward + AdamW:")
        out.append("")
        out += _md_table(["provider", "ms / step (p20-p80)", "tokens/s", "vs PEFT", "peak MB"], [
            [w["provider"], _ms_range(w, "{:.2f}"), f"{w['tokens_per_s']:.0f}",
             _f(w["tokens_per_s"] / peft["tokens_per_s"] if peft else None, "{:.2f}x"), _f(w["peak_mem_mb"], "{:.1f}")]
            for w in tr])
    errs = [w for w in data.get("whole_model", []) if w.get("error")]
    for w in errs:
        out.append(f"- {w['kind']}: failed ({w['error']})")
    return out


def _file_header(data: Dict) -> List[str]:
    out = []
    if data.get("device_type") == "cpu":
        out += ["> **CPU run.** These numbers come from a CPU (no GPU): they exercise the harness and show the "
                "relative cost of the unfused compositions at small shapes. They say nothing about GPU kernels, "
                "and the fused backends (triton, cuda) do not run here.", ""]
    out += [f"- results: `{data['_path']}`", f"- command: `{data.get('command', '?')}`",
            f"- date {data['date']}; torch {data.get('torch')}, triton {data.get('triton')}, CUDA {data.get('cuda')}, "
            f"driver {data.get('driver')}, capability {data.get('capability')}",
            f"- timing: {data.get('timing', {}).get('method', '?')}; peak memory: "
            f"{data.get('timing', {}).get('peak_mem', '?')}"]
    cpu_gemm = data.get("backends", {}).get("torch", {}).get("cpu_gemm")
    if cpu_gemm:  # (files from before the C GEMM have none)
        out.append(f"- the torch backend's fp32 GEMM here: {cpu_gemm}")
    paths = sorted({e["path"] for e in data.get("traffic", [])})
    if paths:
        out.append(f"- passes: bytes read + written by the aten ops of one forward + backward (forward only for "
                   f"forward-only providers), on this device's path ({', '.join(paths)}), in units of one pass over "
                   f"x (M x K elements of x's dtype); counted on meta tensors by `kasa-bench traffic`'s counter "
                   f"(kasa_kernels/bench/traffic.py); opaque: the provider runs custom ops it cannot look into")
    la = data.get("load_avg_1m")
    if la and data.get("device_type") == "cpu":
        out.append(f"- 1-minute load average {la.get('start')} at start, {la.get('end')} at end, on "
                   f"{data['device']}: a load above the core count means other work shared the cores and the "
                   "timings are inflated and spread (see p20-p80)")
    sk = data.get("skipped", [])
    for s in sk:
        where = f" ({s['case']}{', ' + s['mode'] if s.get('mode') else ''})" if s.get("case") else ""
        what = f"`{s['provider']}`" if s.get("provider") else "every provider"
        out.append(f"- skipped {what}{where}: {s['reason']}")
    return out + [""]


def _side_by_side(tables: List[Table]) -> List[str]:
    common = [c for c in tables[0].cases if all(c in t.cases for t in tables[1:])]
    out = ["## Side by side", "",
           "Each device's ratios come from its own run; only ratios are compared across devices.", ""]
    if not common:
        return out + ["(no case is common to all files)", ""]
    names = [_short(t.data) for t in tables]
    for metric, num_mode, den, den_mode in (("full / T_frozen", "full", "frozen_linear", "full"),
                                            ("fwd / T_mm", "forward", "cublas_linear", "forward")):
        out += [f"### {metric}", ""]
        for case in common:
            provs = [p for p in PROVIDERS if any(t.ms(case, p, num_mode) is not None for t in tables)
                     and p != den]
            if not provs:
                continue
            out.append(f"{_case_str(case)}:")
            out.append("")
            rows = [[p] + [_f(t.ratio(case, p, num_mode, den, den_mode)) for t in tables] for p in provs]
            rows.append([f"{den} ms"] + [_f(t.ms(case, den, den_mode)) for t in tables])
            out += _md_table(["provider"] + names, rows)
    out += ["### Performance targets (docs/design.md)", ""]
    per = [targets(t) for t in tables]
    rows = []
    for i, tr in enumerate(per[0]):
        rows.append([tr[0].split(" [")[0], tr[1], tr[2]] + [f"{p[i][3]} ({p[i][4]}/{p[i][5]})" for p in per])
    out += _md_table(["metric", "must", "target"] + [f"{n} value (must/target)" for n in names], rows)
    return out


def render_markdown(datas: List[Dict], plot_files: Sequence[str] = ()) -> str:
    tables = [Table(d) for d in datas]
    lines = ["# kasa-bench report", "", __doc__.split("\n\n", 1)[1].strip(), ""]
    if any(d.get("device_type") == "cpu" for d in datas):
        lines += ["**Contains CPU runs** (marked below): not GPU performance.", ""]
    if len(tables) > 1:
        lines += _side_by_side(tables)
    for t in tables:
        d = t.data
        lines += ["## " + _label(d), ""] + _file_header(d)
        head, is_p = t.headline_case()
        if head is not None:
            lines += [f"#### Headline: {_case_str(head)}" + ("" if is_p else " (shape P is not in this file)"), ""]
            lines += _case_table(t, head)
        lines += ["#### Performance targets of docs/design.md (bf16 at P; pass/fail only where this file has the data)", ""]
        lines += _md_table(["metric", "must", "target", "value", "must", "target"], targets(t))
        lines += ["#### Speedup of ours over each peer (forward+backward; peer ms / ours ms)", ""]
        lines += _peer_table(t)
        lines += ["#### Every case", ""]
        for case, tag in t.cases.items():
            lines += [f"**{_case_str(case)}**" + (f" [{tag}]" if tag else ""), ""]
            lines += _case_table(t, case)
        wm = _whole_model(d)
        if wm:
            lines += ["#### Whole model", ""] + wm
    if plot_files:
        lines += ["## Plots", ""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plot_files] + [""]
    return "\n".join(lines).rstrip() + "\n"


# ----------------------------------------------------------------------------------------------------------------
# Plots


def _sweeps(t: Table) -> Dict[Tuple, List[CaseKey]]:
    """Cases grouped by everything but M, for groups with at least 3 M values."""
    groups: Dict[Tuple, List[CaseKey]] = {}
    for c in t.cases:
        groups.setdefault((c[1], c[2], c[3], c[4], c[5]), []).append(c)
    return {k: sorted(v) for k, v in groups.items() if len(v) >= 3}


def _finish_panel(ax, t: Table, ylabel: str, subtitle: str, legend_size: int) -> None:
    """The 1.0 line (no overhead), the y label, the device's title (marked when a CPU run) and the legend."""
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_ylabel(ylabel)
    cpu = " [CPU run]" if t.data.get("device_type") == "cpu" else ""
    ax.set_title(f"{_short(t.data)}{cpu}\n{subtitle}", fontsize=9)
    ax.legend(fontsize=legend_size)


def _headline_panel(ax, t: Table) -> None:
    """Bars of fwd / T_mm and full / T_frozen per KaSA provider at the headline case."""
    head, is_p = t.headline_case()
    if head is None:
        return
    provs = [p for p in t.providers() if p not in BASELINES]
    full = [t.ratio(head, p, "full", "frozen_linear", "full") or 0 for p in provs]
    fwd = [t.ratio(head, p, "forward", "cublas_linear", "forward") or 0 for p in provs]
    xs = range(len(provs))
    ax.bar([x - 0.2 for x in xs], fwd, 0.4, label="forward / T_mm")
    ax.bar([x + 0.2 for x in xs], full, 0.4, label="fwd+bwd / T_frozen")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(provs, rotation=30, ha="right", fontsize=8)
    _finish_panel(ax, t, "time ratio (lower is better)", _case_str(head), 8)


def _msweep_panel(ax, t: Table, groups: Dict[Tuple, List[CaseKey]]) -> None:
    """full / T_frozen against M per KaSA provider, for the first sweep group."""
    if not groups:
        ax.set_axis_off()
        return
    gk, cases = next(iter(groups.items()))
    for p in t.providers():
        if p in BASELINES:
            continue
        pts = [(c[0], t.ratio(c, p, "full", "frozen_linear", "full")) for c in cases]
        pts = [(m, v) for m, v in pts if v is not None]
        if pts:
            ax.plot([m for m, _ in pts], [v for _, v in pts], marker="o", label=p)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("M (tokens)")
    _finish_panel(ax, t, "fwd+bwd / T_frozen (lower is better)",
                  f"K={gk[0]} N={gk[1]} r={gk[2]} p={gk[3]:g} {gk[4]}", 7)


def plot(tables: List[Table], out_dir: str, name: str) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def panels():  # one panel per device
        return plt.subplots(1, len(tables), figsize=(6.5 * len(tables), 4.2), squeeze=False)

    def save(fig, what: str) -> str:
        fig.tight_layout()
        path = os.path.join(out_dir, f"{name}-{what}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    # 1. headline bars: full / T_frozen and fwd / T_mm per provider
    fig, axes = panels()
    for ax, t in zip(axes[0], tables):
        _headline_panel(ax, t)
    files = [save(fig, "headline")]
    # 2. M sweep: full / T_frozen vs M (the first sweep group of each file)
    sweeps = [(t, _sweeps(t)) for t in tables]
    if any(s for _, s in sweeps):
        fig, axes = panels()
        for ax, (t, groups) in zip(axes[0], sweeps):
            _msweep_panel(ax, t, groups)
        files.append(save(fig, "msweep"))
    return files


def render(paths: Sequence[str], out_dir: Optional[str] = None, name: Optional[str] = None,
           plots: bool = True) -> List[str]:
    """Write <out_dir>/<name>.md (and PNGs); returns the paths written. A traffic file (kasa-bench traffic) gets its
    own report."""
    if len(paths) == 1 and _is_traffic(paths[0]):
        from .traffic import render as render_traffic

        return [render_traffic(paths[0], out_dir, name)]
    datas = [load(p) for p in paths]
    out_dir = out_dir or os.path.dirname(os.path.abspath(paths[0]))
    os.makedirs(out_dir, exist_ok=True)
    if name is None:
        name = os.path.splitext(os.path.basename(paths[0]))[0]
        if len(paths) > 1:
            name = "compare-" + "-vs-".join(_short(d) for d in datas)
    pngs = plot([Table(d) for d in datas], out_dir, name) if plots else []
    md = render_markdown(datas, pngs)
    md_path = os.path.join(out_dir, f"{name}.md")
    with open(md_path, "w") as f:
        f.write(md)
    return [md_path] + list(pngs)
