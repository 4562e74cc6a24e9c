"""Where one VLM training step's time goes: a torch-profiler breakdown of (c) ours in ``vlm_throughput.py``.

``vlm_throughput.py --profile K`` runs K more steps after the timed ones under the profiler (so the timed steps are
not perturbed) with :class:`StepProfiler` as a Lightning callback, and writes ``<name>_<run>_profile.{json,txt}``
(and the Chrome trace, gzipped, when it is small enough to keep). Each kernel is attributed to the phase during
which the CPU *launched* it:

* ``vision_fwd``: the vision tower's forward (``VisionLanguageWithLoss.vision_features``);
* ``lm_fwd``: the rest of the forward (embedding, feature scatter, the language model, the fused loss);
* ``lm_bwd``: backward until the gradient reaches the tower's output (a tensor hook marks the moment);
* ``vision_bwd``: the rest of backward (the tower, its recomputation under checkpointing);
* ``tail``: after backward (gradient clipping, the optimizer, the step's bookkeeping);
* ``between``: between two steps (Lightning's loop, the batch's copy to the device).

Per phase: GPU kernel time by category (GEMM, attention, Triton/Inductor, elementwise, copies, optimizer, ...);
per step: the GPU's busy and idle time and the largest idle gaps with the CPU op that was running before the kernel
that ended them; host syncs (``cudaStreamSynchronize``, device-to-host copies, ...) with the ATen op that caused
them; memory allocated at the phase boundaries. A saved trace can be summarised again::

    python bench/profile_vlm.py TRACE.json.gz
"""

from __future__ import annotations

import bisect
import gc
import gzip
import json
import re
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

PHASES = ("between", "vision_fwd", "lm_fwd", "lm_bwd", "vision_bwd", "tail")
CATEGORIES = [  # first match wins
    ("attention", re.compile(r"flash|fmha|attention|attn", re.I)),
    ("gemm", re.compile(r"gemm|nvjet|cutlass|xmma|cublas|splitK|Kernel2", re.I)),
    ("nccl/fsdp", re.compile(r"nccl|split_with_sizes_copy|chunk_cat|all_gather|reduce_scatter", re.I)),
    ("triton", re.compile(r"^triton_|triton", re.I)),
    ("foreach/optimizer", re.compile(r"adam|multi_tensor|foreach", re.I)),
    ("memcpy/memset", re.compile(r"^Memcpy|^Memset|memcpy|memset", re.I)),
    ("reduce", re.compile(r"reduce_kernel|norm|softmax", re.I)),
    ("index/scatter", re.compile(r"index|scatter|gather|nonzero|masked|cumsum|sort|unique", re.I)),
    ("elementwise/copy", re.compile(r"elementwise|copy|cat|fill", re.I)),
]
SYNC_CALLS = re.compile(
    r"cudaStreamSynchronize|cudaDeviceSynchronize|cudaEventSynchronize|cudaMemcpy(?!Async)|cuStreamSynchronize|"
    r"cudaStreamWaitEvent_sync"
)


class StepProfiler:
    """A Lightning callback: profile steps ``start .. start + count - 1`` and summarise them into ``out/stem_*``.

    It also wraps the module's vision forward and backward call with ``record_function`` markers (the phases above)
    and records the allocator's counters at the phase boundaries (host-side numbers: no device sync).
    """

    def __init__(self, start: int, count: int, out: Path, stem: str, keep_trace: bool = False) -> None:
        self.start, self.count, self.out, self.stem, self.keep_trace = start, count, out, stem, keep_trace
        self.prof: Any = None
        self.step_range: Any = None
        self.memory: list[dict[str, float]] = []

    # ------------------------------------------------------------------------------------------ Lightning hooks
    def _lightning_callback(self) -> Any:
        import lightning.pytorch as pl

        outer = self

        class _Callback(pl.Callback):
            def on_train_start(self, trainer, pl_module) -> None:
                outer._instrument(pl_module)

            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
                if batch_idx == outer.start:
                    _synchronize()
                    outer._start()
                if outer.prof is not None:
                    outer.memory.append({"step_start": _allocated()})
                    outer.step_range = torch.profiler.record_function("phase:step")
                    outer.step_range.__enter__()

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
                if outer.prof is None:
                    return
                outer.step_range.__exit__(None, None, None)
                outer.memory[-1]["peak_so_far"] = (
                    torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
                )
                if batch_idx == outer.start + outer.count - 1:
                    _synchronize()
                    outer._stop()

        return _Callback()

    def callback(self) -> Any:
        """The Lightning callback to append to ``trainer.callbacks``."""
        return self._lightning_callback()

    def _instrument(self, module: Any) -> None:
        root = module.model
        vision_features = root.vision_features
        outer = self

        def mark_vision_backward(grad: torch.Tensor) -> None:
            with torch.profiler.record_function("mark:vision_bwd"):
                pass

        def vision_features_marked(*args: Any, **kwargs: Any) -> Any:
            with torch.profiler.record_function("phase:vision_fwd"):
                features, deepstack, real = vision_features(*args, **kwargs)
            if outer.prof is not None:
                outer.memory[-1]["after_vision_fwd"] = _allocated()
            if features.requires_grad:
                features.register_hook(mark_vision_backward)
            return features, deepstack, real

        root.vision_features = vision_features_marked
        backward = module.manual_backward

        def backward_marked(loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
            if outer.prof is not None:
                outer.memory[-1]["forward_end"] = _allocated()
            with torch.profiler.record_function("phase:backward"):
                backward(loss, *args, **kwargs)
            if outer.prof is not None:
                outer.memory[-1]["backward_end"] = _allocated()

        module.manual_backward = backward_marked

    # ------------------------------------------------------------------------------------------ profiler
    def _gc_callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        elif self._gc_started is not None:
            self.gc_pauses.append((info["generation"], time.perf_counter() - self._gc_started))
            self._gc_started = None

    def _start(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        self.gc_pauses: list[tuple[int, float]] = []
        self._gc_started: float | None = None
        gc.callbacks.append(self._gc_callback)
        self.prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
        self.prof.__enter__()

    def _stop(self) -> None:
        prof, self.prof = self.prof, None
        prof.__exit__(None, None, None)
        gc.callbacks.remove(self._gc_callback)
        self.out.mkdir(parents=True, exist_ok=True)
        raw = self.out / f"{self.stem}_trace.json"
        prof.export_chrome_trace(str(raw))
        trace = json.loads(raw.read_text())
        summary = summarize(trace)
        summary["memory_gib"] = self.memory
        summary["gc_pauses_ms_per_step"] = {
            f"gen{g}": {"count": sum(1 for x, _ in self.gc_pauses if x == g) / self.count,
                        "ms": sum(t for x, t in self.gc_pauses if x == g) * 1e3 / self.count,
                        "max_ms": max((t for x, t in self.gc_pauses if x == g), default=0.0) * 1e3}
            for g in (0, 1, 2)
        }  # fmt: skip
        (self.out / f"{self.stem}_profile.json").write_text(json.dumps(summary, indent=1))
        (self.out / f"{self.stem}_profile.txt").write_text(render(summary))
        if self.keep_trace:
            (self.out / f"{self.stem}_trace.json.gz").write_bytes(gzip.compress(raw.read_bytes(), 6))
        raw.unlink()
        print(render(summary), flush=True)


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _allocated() -> float:
    return torch.cuda.memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


# ---------------------------------------------------------------------------------------------------- analysis
def category(name: str) -> str:
    """A kernel's category from its name (see ``CATEGORIES``)."""
    for label, pattern in CATEGORIES:
        if pattern.search(name):
            return label
    return "other"


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for a, b in sorted(intervals):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return [(a, b) for a, b in merged]


def summarize(trace: dict[str, Any]) -> dict[str, Any]:
    """The breakdown described in the module docstring, from a Chrome trace of whole profiled steps."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    gpu = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    launches = {
        e["args"]["correlation"]: e
        for e in events
        if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})
    }
    annotations = [e for e in events if e.get("cat") == "user_annotation"]
    steps = sorted((e["ts"], e["ts"] + e["dur"]) for e in annotations if e["name"] == "phase:step")
    vision = sorted((e["ts"], e["ts"] + e["dur"]) for e in annotations if e["name"] == "phase:vision_fwd")
    backward = sorted((e["ts"], e["ts"] + e["dur"]) for e in annotations if e["name"] == "phase:backward")
    marks = sorted(e["ts"] for e in annotations if e["name"] == "mark:vision_bwd")

    def phase_of(ts: float) -> str:
        for a, b in vision:
            if a <= ts <= b:
                return "vision_fwd"
        for a, b in backward:
            if a <= ts <= b:
                # The earliest mark inside this backward splits it (several tower outputs each fire a hook).
                inside = [m for m in marks if a <= m <= b]
                return "vision_bwd" if inside and ts >= inside[0] else "lm_bwd"
        step = next(((a, b) for a, b in steps if a <= ts <= b), None)
        if step is None:
            return "between" if steps and steps[0][0] <= ts <= steps[-1][1] else "outside"
        first_backward = next((a for a, _ in backward if step[0] <= a <= step[1]), step[1])
        return "lm_fwd" if ts < first_backward else "tail"

    kernels = []
    for e in gpu:
        launch = launches.get(e.get("args", {}).get("correlation"))
        launch_ts = launch["ts"] if launch is not None else e["ts"]
        kernels.append({"name": e["name"], "ts": e["ts"], "end": e["ts"] + e["dur"], "dur": e["dur"],
                        "launch": launch_ts, "tid": None if launch is None else launch.get("tid"),
                        "phase": phase_of(launch_ts), "cat": category(e["name"])})  # fmt: skip
    kernels.sort(key=lambda k: k["ts"])
    kernels = [k for k in kernels if k["phase"] != "outside"]
    n_steps = max(1, len(steps))
    if not kernels:
        return {"steps": len(steps), "error": "no GPU kernels in the profiled steps"}

    window = (kernels[0]["ts"], max(k["end"] for k in kernels))
    busy = _union([(k["ts"], k["end"]) for k in kernels])
    busy_us = sum(b - a for a, b in busy)
    wall_us = window[1] - window[0]

    phases: dict[str, Any] = {}
    for phase in PHASES:
        mine = [k for k in kernels if k["phase"] == phase]
        if not mine:
            continue
        cats: dict[str, float] = defaultdict(float)
        for k in mine:
            cats[k["cat"]] += k["dur"]
        spans = []  # per step: the GPU span of this phase (first start to last end) and its busy union
        for a, b in steps:
            in_step = [k for k in mine if a <= k["launch"] <= b]
            if in_step:
                spans.append((min(k["ts"] for k in in_step), max(k["end"] for k in in_step),
                              sum(x - y for y, x in _union([(k["ts"], k["end"]) for k in in_step]))))  # fmt: skip
        span_ms = sum(e - s for s, e, _ in spans) / 1e3 / n_steps
        busy_ms = sum(u for _, _, u in spans) / 1e3 / n_steps
        phases[phase] = {
            "kernel_ms_per_step": sum(k["dur"] for k in mine) / 1e3 / n_steps,
            "gpu_span_ms_per_step": span_ms,
            "gpu_busy_in_span_ms_per_step": busy_ms,
            "kernels_per_step": len(mine) / n_steps,
            "by_category_ms_per_step": {c: v / 1e3 / n_steps for c, v in sorted(cats.items(), key=lambda x: -x[1])},
        }

    by_name: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for k in kernels:
        by_name[k["name"]][0] += 1
        by_name[k["name"]][1] += k["dur"]
    top = sorted(by_name.items(), key=lambda x: -x[1][1])[:30]
    by_cat: dict[str, float] = defaultdict(float)
    for k in kernels:
        by_cat[k["cat"]] += k["dur"]

    # Idle gaps on the GPU, with the CPU op running when the kernel that ended the gap was launched.
    cpu_ops = sorted((e for e in events if e.get("cat") == "cpu_op"), key=lambda e: e["ts"])
    op_starts = [e["ts"] for e in cpu_ops]

    def enclosing_ops(ts: float, tid: Any) -> list[str]:
        out = []
        i = bisect.bisect_right(op_starts, ts)
        for e in reversed(cpu_ops[max(0, i - 4000) : i]):
            if e.get("tid") == tid and e["ts"] <= ts <= e["ts"] + e["dur"]:
                out.append(e["name"])
        return out[:4]  # innermost first

    starts = {k["ts"]: k for k in kernels}
    gaps = []
    for (_, end), (start, _) in zip(busy, busy[1:]):
        if start - end > 100:  # µs
            nxt = starts.get(start, {})
            gaps.append({"idle_ms": (start - end) / 1e3, "next_kernel": nxt.get("name", "?")[:80],
                         "phase": nxt.get("phase", "?"), "launch": nxt.get("launch"), "tid": nxt.get("tid"),
                         "gap": (end, start)})  # fmt: skip
    idle_by_phase: dict[str, float] = defaultdict(float)
    for g in gaps:
        idle_by_phase[g["phase"]] += g["idle_ms"] / n_steps
    gaps.sort(key=lambda g: -g["idle_ms"])
    gaps = gaps[:25]
    ops_by_tid: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for e in sorted(cpu_ops + annotations, key=lambda e: e["ts"]):
        ops_by_tid[e.get("tid")].append(e)
    starts_by_tid = {tid: [e["ts"] for e in ops] for tid, ops in ops_by_tid.items()}
    for g in gaps:
        launch, tid = g.pop("launch"), g.pop("tid")
        g["cpu_ops_at_launch"] = enclosing_ops(launch, tid) if launch is not None else []
        # What the launching thread ran while the GPU waited: its ops overlapping the gap, longest overlap first.
        lo, hi = g.pop("gap")
        ops, op_ts = ops_by_tid.get(tid, []), starts_by_tid.get(tid, [])
        i = bisect.bisect_right(op_ts, hi)
        overlap: dict[str, float] = defaultdict(float)
        for e in ops[max(0, i - 20000) : i]:
            cut = min(hi, e["ts"] + e["dur"]) - max(lo, e["ts"])
            if cut > 0:
                overlap[e["name"]] += cut
        g["thread_ops_during_gap_ms"] = {k[:80]: round(v / 1e3, 2) for k, v in sorted(overlap.items(), key=lambda x: -x[1])[:8]}

    syncs: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for e in events:
        if e.get("cat") in ("cuda_runtime", "cuda_driver") and SYNC_CALLS.search(e["name"]):
            ops = enclosing_ops(e["ts"], e.get("tid"))
            key = f"{e['name']} <- {' < '.join(ops[:3]) or '?'}"
            syncs[key][0] += 1 / n_steps
            syncs[key][1] += e["dur"] / 1e3 / n_steps
    dtoh = sum(1 for e in gpu if "DtoH" in e["name"]) / n_steps
    # CPU time of the annotated ranges: the phases, and FSDP2's hooks by kind (the module name cut off).
    cpu_ranges: dict[str, float] = defaultdict(float)
    for e in annotations:
        if not e["name"].startswith("mark:"):
            cpu_ranges[e["name"].split(" (")[0].split(" for ")[0]] += e["dur"] / 1e3 / n_steps

    return {
        "steps": len(steps),
        "step_wall_ms": wall_us / 1e3 / n_steps,
        "gpu_busy_ms_per_step": busy_us / 1e3 / n_steps,
        "gpu_idle_ms_per_step": (wall_us - busy_us) / 1e3 / n_steps,
        "kernel_ms_per_step": sum(k["dur"] for k in kernels) / 1e3 / n_steps,
        "kernels_per_step": len(kernels) / n_steps,
        "by_category_ms_per_step": {c: v / 1e3 / n_steps for c, v in sorted(by_cat.items(), key=lambda x: -x[1])},
        "phases": phases,
        "cpu_ranges_ms_per_step": dict(sorted(cpu_ranges.items(), key=lambda x: -x[1])),
        "idle_gap_ms_per_step_by_phase": dict(idle_by_phase),
        "largest_gaps": gaps[:25],
        "dtoh_copies_per_step": dtoh,
        "host_syncs_per_step": {k: {"count": v[0], "ms": v[1]} for k, v in sorted(syncs.items(), key=lambda x: -x[1][1])},
        "top_kernels": [{"name": n[:110], "count_per_step": c / n_steps, "ms_per_step": t / 1e3 / n_steps,
                         "category": category(n)} for n, (c, t) in top],  # fmt: skip
    }


def render(s: dict[str, Any]) -> str:
    """A plain-text view of :func:`summarize`'s result."""
    if "error" in s:
        return s["error"]
    lines = [
        f"profiled steps: {s['steps']}; per step: wall (GPU window) {s['step_wall_ms']:.1f} ms, GPU busy "
        f"{s['gpu_busy_ms_per_step']:.1f} ms, idle {s['gpu_idle_ms_per_step']:.1f} ms; kernels "
        f"{s['kernels_per_step']:.0f}; device-to-host copies {s['dtoh_copies_per_step']:.0f}",
        "",
        "kernel time by category (ms/step): "
        + ", ".join(f"{c} {v:.1f}" for c, v in s["by_category_ms_per_step"].items()),
        "",
        "phase        kernel ms  GPU span ms  busy in span  kernels  top categories",
    ]
    for phase, p in s["phases"].items():
        cats = ", ".join(f"{c} {v:.1f}" for c, v in list(p["by_category_ms_per_step"].items())[:5])
        lines.append(f"{phase:<12} {p['kernel_ms_per_step']:9.1f}  {p['gpu_span_ms_per_step']:11.1f}  "
                     f"{p['gpu_busy_in_span_ms_per_step']:12.1f}  {p['kernels_per_step']:7.0f}  {cats}")  # fmt: skip
    lines += ["", "CPU time of annotated ranges (ms/step): "
              + ", ".join(f"{k} {v:.1f}" for k, v in list(s["cpu_ranges_ms_per_step"].items())[:14])]  # fmt: skip
    lines += ["", "GPU idle gaps > 0.1 ms by phase of the next kernel (ms/step): "
              + ", ".join(f"{k} {v:.1f}" for k, v in s["idle_gap_ms_per_step_by_phase"].items()), "",
              "largest idle gaps:"]  # fmt: skip
    for g in s["largest_gaps"][:15]:
        lines.append(f"  {g['idle_ms']:7.2f} ms before {g['next_kernel'][:60]} [{g['phase']}] "
                     f"cpu: {' < '.join(g['cpu_ops_at_launch'][:3])}")  # fmt: skip
        during = g.get("thread_ops_during_gap_ms", {})
        lines.append("           launching thread meanwhile: " + ", ".join(f"{k} {v}" for k, v in list(during.items())[:6]))
    lines += ["", "host syncs per step (count, CPU ms blocked):"]
    for k, v in list(s["host_syncs_per_step"].items())[:20]:
        lines.append(f"  {v['count']:5.1f}  {v['ms']:8.2f} ms  {k[:150]}")
    lines += ["", "top kernels (ms/step, count/step):"]
    for k in s["top_kernels"]:
        lines.append(f"  {k['ms_per_step']:8.2f}  {k['count_per_step']:6.0f}  [{k['category']}] {k['name']}")
    if s.get("gc_pauses_ms_per_step"):
        lines += ["", "garbage collector per step: " + "; ".join(
            f"{g} {v['count']:.0f}× {v['ms']:.1f} ms (max {v['max_ms']:.1f})" for g, v in s["gc_pauses_ms_per_step"].items())]  # fmt: skip
    if s.get("memory_gib"):
        lines += ["", "memory allocated (GiB) at: " + "; ".join(
            ", ".join(f"{k} {v:.1f}" for k, v in m.items()) for m in s["memory_gib"])]  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    path = Path(sys.argv[1])
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    print(render(summarize(json.loads(raw))))
