"""The ``veomni-lightning`` console script on the shipped configs: print_config, the tiny smoke job on 1 and 2 processes
(same losses), clear errors for bad values, and the README's main job (SmolLM2-135M on real text, HF export)."""

from __future__ import annotations

import csv
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "text" / "tiny_qwen3_cpu.yaml"
MAIN_CONFIG = REPO / "configs" / "text" / "smollm2_135m_cpu.yaml"


def _cli() -> str:
    """The installed console script (next to this interpreter), falling back to PATH."""
    exe = Path(sys.executable).parent / "veomni-lightning"
    found = str(exe) if exe.exists() else shutil.which("veomni-lightning")
    assert found, "the veomni-lightning console script is not installed (pip install -e .)"
    return found


def _run_cli(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([_cli(), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def _read_metrics(save_dir: Path) -> list[dict[str, str]]:
    files = sorted(save_dir.rglob("metrics.csv"))
    assert len(files) == 1, f"expected one metrics.csv under {save_dir}, found {files}"
    with files[0].open() as f:
        return list(csv.DictReader(f))


def _train_losses(rows: list[dict[str, str]]) -> dict[int, float]:
    return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}


def _grad_norms(rows: list[dict[str, str]]) -> dict[int, float]:
    return {int(r["step"]): float(r["train/grad_norm"]) for r in rows if r.get("train/grad_norm")}


# ---------------------------------------------------------------------------------------------------------------------
# print_config
# ---------------------------------------------------------------------------------------------------------------------


def test_print_config(tmp_path):
    proc = _run_cli(["fit", "--config", str(TINY_CONFIG), "--print_config"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    config = yaml.safe_load(proc.stdout)
    strategy = config["trainer"]["strategy"]
    assert strategy["class_path"].endswith("VeOmniStrategy")
    assert (
        strategy["init_args"]["parallel"]["param_dtype"] == "fp32" and strategy["init_args"]["parallel"]["sp_size"] == 1
    )
    assert config["model"]["class_path"].endswith("CausalLMModule")
    assert config["data"]["class_path"].endswith("TextDataModule")
    for name in ("VeOmniStrategy", "CausalLMModule", "TextDataModule"):
        assert name in proc.stdout
    assert not (tmp_path / "outputs").exists(), "--print_config must not train or write outputs"


# ---------------------------------------------------------------------------------------------------------------------
# The tiny job end to end, on 1 process and on 2 processes with Ulysses sp=2
# ---------------------------------------------------------------------------------------------------------------------

TINY_STEPS = 3


def _fit_tiny(tmp_path: Path, name: str, extra: list[str]) -> list[dict[str, str]]:
    save_dir = tmp_path / name
    args = [
        "fit",
        "--config",
        str(TINY_CONFIG),
        "--trainer.logger.init_args.save_dir",
        str(save_dir),
        "--trainer.max_steps",
        str(TINY_STEPS),
        "--trainer.enable_progress_bar",
        "false",
        *extra,
    ]
    proc = _run_cli(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert not (tmp_path / "outputs").exists(), "the logger save_dir override was not honoured"
    return _read_metrics(save_dir)


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tiny_cli")
    single = _fit_tiny(tmp, "single", [])
    sp2 = _fit_tiny(tmp, "sp2", ["--trainer.devices", "2", "--trainer.strategy.parallel.sp_size", "2"])
    return single, sp2


def test_tiny_config_trains_end_to_end(tiny_runs):
    rows, _ = tiny_runs
    losses = _train_losses(rows)
    assert sorted(losses) == list(range(TINY_STEPS)), rows
    assert all(math.isfinite(v) for v in losses.values())
    # Random init over the 49152-token vocabulary: the loss starts near ln(49152) ≈ 10.8 and goes down.
    assert abs(losses[0] - math.log(49152)) < 0.5
    assert losses[TINY_STEPS - 1] < losses[0]
    assert all(math.isfinite(v) and v > 0 for v in _grad_norms(rows).values())


def test_tiny_config_sp2_matches_single_process(tiny_runs):
    single, sp2 = tiny_runs
    a, b = _train_losses(single), _train_losses(sp2)
    assert sorted(a) == sorted(b) == list(range(TINY_STEPS))
    for step in a:
        assert math.isclose(a[step], b[step], rel_tol=1e-4), (step, a[step], b[step])
    ga, gb = _grad_norms(single), _grad_norms(sp2)
    for step in ga:
        assert math.isclose(ga[step], gb[step], rel_tol=1e-3), (step, ga[step], gb[step])


# ---------------------------------------------------------------------------------------------------------------------
# Bad values give clear errors
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--trainer.strategy.parallel.param_dtype", "fp8"], ["param_dtype", "fp8", "'fp32', 'bf16', 'fp16'"]),
        (["--trainer.strategy.no_such_arg", "3"], ["VeOmniStrategy", "no_such_arg", "not accepted"]),
        (["--trainer.strategy.parallel.sp_size", "two"], ["sp_size", "two"]),
    ],
    ids=["param_dtype_fp8", "unknown_strategy_arg", "non_int_sp"],
)
def test_bad_config_values_give_clear_errors(tmp_path, monkeypatch, capsys, extra, expected):
    from veomni_lightning.cli import build_cli

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        build_cli(["fit", "--config", str(TINY_CONFIG), *extra, "--print_config"])
    assert info.value.code != 0
    err = capsys.readouterr().err
    for text in expected:
        assert text in err, err[-3000:]


def test_impossible_layout_from_cli(tmp_path, monkeypatch):
    # sp=3 on one process: the strategy's layout check names the sizes before any process group exists.
    from veomni_lightning.cli import build_cli
    from veomni_lightning.parallel.dims import ParallelLayoutError

    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(TINY_CONFIG), "--trainer.strategy.parallel.sp_size", "3", "--trainer.max_steps", "1"]
    args += ["--trainer.logger.init_args.save_dir", str(tmp_path / "logs"), "--trainer.enable_progress_bar", "false"]
    with pytest.raises(ParallelLayoutError, match=r"world size 1 is not divisible by dp_replicate \(1\) × sp \(3\)"):
        build_cli(args)


# ---------------------------------------------------------------------------------------------------------------------
# The README's main job
# ---------------------------------------------------------------------------------------------------------------------


def _main_config_in(tmp: Path) -> tuple[Path, Path, Path, Path]:
    """The shipped main-job yaml with every output path moved under ``tmp``; nothing else changed."""
    config = yaml.safe_load(MAIN_CONFIG.read_text())
    logs, ckpts, hf = tmp / "logs", tmp / "checkpoints", tmp / "hf"
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(logs)
    callbacks = config["trainer"]["callbacks"]
    by_name = {cb["class_path"].rsplit(".", 1)[-1]: cb for cb in callbacks}
    assert set(by_name) == {"ModelCheckpoint", "HFExport"}, callbacks
    by_name["ModelCheckpoint"]["init_args"]["dirpath"] = str(ckpts)
    by_name["HFExport"]["init_args"]["dirpath"] = str(hf)
    path = tmp / "smollm2_135m_cpu.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path, logs, ckpts, hf


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_readme_main_job(tmp_path):
    config_path, logs, ckpts, hf = _main_config_in(tmp_path)
    proc = _run_cli(["fit", "--config", str(config_path), "--trainer.enable_progress_bar", "false"], tmp_path, 900)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert not (tmp_path / "outputs").exists()

    max_steps = yaml.safe_load(MAIN_CONFIG.read_text())["trainer"]["max_steps"]
    losses = _train_losses(_read_metrics(logs))
    assert sorted(losses) == list(range(max_steps))
    assert all(math.isfinite(v) for v in losses.values())
    # A pretrained model on English news: the loss is far below the uniform ln(49152) ≈ 10.8.
    assert max(losses.values()) < 6.0, losses

    saved = sorted(ckpts.iterdir())
    assert [p.name for p in saved] == [f"epoch=0-step={max_steps}.ckpt"], saved
    assert saved[0].is_dir() and (saved[0] / ".metadata").is_file()  # a sharded DCP folder
    assert not list(ckpts.glob("*.tmp")) and not list(ckpts.glob("*.old"))

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert (hf / "config.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(hf)
    tokenizer = AutoTokenizer.from_pretrained(hf)
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    new_tokens = out[0, inputs["input_ids"].shape[1] :]
    assert len(new_tokens) > 0
    text = tokenizer.decode(new_tokens, skip_special_tokens=True)
    assert text.strip(), f"empty generation: {new_tokens.tolist()}"
