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
    # Warnings stay on: the runs below also check that stderr carries none of the known noise.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    return subprocess.run([_cli(), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(autouse=True)
def _argv_of_the_command(monkeypatch):
    """In-process CLI calls pass ``args``; pytest's own argv would make LightningCLI warn about both being given."""
    monkeypatch.setattr(sys, "argv", ["veomni-lightning"])


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

#: Upstream notices the command silences or whose cause we fixed; none may reach a run's stderr.
NOISE = [
    "litlogger",
    "litmodels",
    "Slicing a flattened dim",
    "LeafSpec",
    "Total length of",
    "Using ModelCheckpoint with manual optimization",
    "Total FLOPs",
    "Skipping val loop",
]


def _fit_tiny(cwd: Path, extra: list[str]) -> subprocess.CompletedProcess:
    """The tiny config with its default outputs under ``cwd``, plus an HF export into the run folder."""
    args = ["fit", "--config", str(TINY_CONFIG), "--trainer.max_steps", str(TINY_STEPS)]
    args += ["--trainer.callbacks+", "veomni_lightning.callbacks.HFExport", *extra]
    proc = _run_cli(args, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return proc


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """Two runs of the tiny config in one folder: one process, then 2 processes with sp=2 (the second run)."""
    cwd = tmp_path_factory.mktemp("tiny_cli")
    root = cwd / "outputs" / "tiny_qwen3_cpu"
    single = _fit_tiny(cwd, [])
    first_export = {p.name: _sha256(p) for p in (root / "version_0" / "hf").iterdir()}
    sp2 = _fit_tiny(cwd, ["--trainer.devices", "2", "--trainer.strategy.parallel.sp_size", "2"])
    return {
        "root": root,
        "procs": (single, sp2),
        "rows": (_read_metrics(root / "version_0"), _read_metrics(root / "version_1")),
        "first_export": first_export,
    }


def test_tiny_config_trains_end_to_end(tiny_runs):
    rows, _ = tiny_runs["rows"]
    losses = _train_losses(rows)
    assert sorted(losses) == list(range(TINY_STEPS)), rows
    assert all(math.isfinite(v) for v in losses.values())
    # Random init over the 49152-token vocabulary: the loss starts near ln(49152) ≈ 10.8 and goes down.
    assert abs(losses[0] - math.log(49152)) < 0.5
    assert losses[TINY_STEPS - 1] < losses[0]
    assert all(math.isfinite(v) and v > 0 for v in _grad_norms(rows).values())
    # The logged lr is the one each step applied (warm-up over 1 step, then cosine), not the next step's.
    from veomni_lightning.modules.base import warmup_cosine

    lrs = {int(r["step"]): float(r["train/lr"]) for r in rows if r.get("train/lr")}
    init = yaml.safe_load(TINY_CONFIG.read_text())["model"]["init_args"]
    for step, lr in lrs.items():
        want = init["learning_rate"] * warmup_cosine(
            step, warmup_steps=init["warmup_steps"], total_steps=TINY_STEPS, min_ratio=0.1
        )
        assert math.isclose(lr, want, rel_tol=1e-6), (step, lr, want)


def test_tiny_config_sp2_matches_single_process(tiny_runs):
    single, sp2 = tiny_runs["rows"]
    a, b = _train_losses(single), _train_losses(sp2)
    assert sorted(a) == sorted(b) == list(range(TINY_STEPS))
    for step in a:
        assert math.isclose(a[step], b[step], rel_tol=1e-4), (step, a[step], b[step])
    ga, gb = _grad_norms(single), _grad_norms(sp2)
    for step in ga:
        assert math.isclose(ga[step], gb[step], rel_tol=1e-3), (step, ga[step], gb[step])


def test_runs_get_their_own_folders_and_never_replace_an_export(tiny_runs):
    root = tiny_runs["root"]
    assert sorted(p.name for p in root.iterdir()) == ["version_0", "version_1"]
    for run in ("version_0", "version_1"):
        folder = root / run
        assert {"metrics.csv", "config.yaml", "hf"} <= {p.name for p in folder.iterdir()}, run
        assert (folder / "hf" / "config.json").is_file()
    # The second run exported into its own folder; the first run's export is byte for byte what it was.
    first = root / "version_0" / "hf"
    assert {p.name: _sha256(p) for p in first.iterdir()} == tiny_runs["first_export"]


def test_export_files_get_the_users_file_mode(tiny_runs):
    umask = os.umask(0)
    os.umask(umask)
    for path in (tiny_runs["root"] / "version_1" / "hf").iterdir():
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, (path, oct(path.stat().st_mode))


def test_output_that_is_not_a_terminal_gets_one_line_per_logging_step(tiny_runs):
    for proc in tiny_runs["procs"]:
        lines = proc.stdout.splitlines()
        steps = [line for line in lines if line.startswith("step ")]
        assert [line.split()[1] for line in steps] == [f"{s}/{TINY_STEPS}" for s in range(1, TINY_STEPS + 1)], lines
        assert all(len(line) <= 80 and " loss " in line and " lr " in line for line in steps), steps
        assert any(line.startswith("Training CausalLMModule:") for line in lines), lines
        assert "Epoch 0" not in proc.stdout and "\r" not in proc.stdout


@pytest.mark.parametrize("run", [0, 1], ids=["one_process", "sp2_two_processes"])
def test_run_stderr_is_free_of_known_noise(tiny_runs, run):
    err = tiny_runs["procs"][run].stderr
    assert not [text for text in NOISE if text in err], err[-4000:]
    assert "Warning" not in err, err[-4000:]  # nothing else slipped in either


def test_progress_is_plain_lines_off_a_terminal_and_one_rewritten_line_on_it():
    import io

    from veomni_lightning.callbacks import StepProgress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert StepProgress(stream=io.StringIO()).plain
    tty = Terminal()
    bar = StepProgress(stream=tty)
    assert not bar.plain
    bar._write("step 1/2", final=False)
    bar._write("step 2/2", final=True)
    assert tty.getvalue() == "\r" + "step 1/2".ljust(80) + "\r" + "step 2/2".ljust(80) + "\n"


def test_progress_line_format():
    from veomni_lightning.callbacks.progress import format_progress_line

    metrics = {"train/loss": 2.34567, "train/lr": 5e-5, "train/tokens_per_s_per_device": 12345.0}
    line = format_progress_line(12, 100000, metrics, elapsed=62.0, eta=3600.0 * 30)
    assert line.startswith("step 12/100000  loss 2.3457  lr 5.00e-05  12.3k tok/s/dev  0:01:02 ETA 1 day"), line
    assert len(line) <= 80
    assert format_progress_line(3, None, {}, elapsed=1.0, eta=None) == "step 3  0:00:01"


# ---------------------------------------------------------------------------------------------------------------------
# Bad values give clear errors
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--trainer.strategy.parallel.param_dtype", "fp8"], ["param_dtype", "fp8", "'fp32', 'bf16', 'fp16'"]),
        (["--trainer.strategy.no_such_arg", "3"], ["VeOmniStrategy has no argument 'no_such_arg'"]),
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


@pytest.mark.parametrize(
    "extra, first_line",
    [
        (["--trainer.max_step", "2"], "error: unknown option --trainer.max_step; did you mean '--trainer.max_steps'?"),
        (
            ["--model.init_args.learning_rte", "1e-3"],
            "error: CausalLMModule has no argument 'learning_rte'; did you mean 'learning_rate'?",
        ),
        (
            ["--trainer.strategy.parallel.sp_sise", "2"],
            "error: ParallelConfig has no argument 'sp_sise'; did you mean 'sp_size'?",
        ),
    ],
    ids=["abbreviated_flag", "misspelt_model_arg", "misspelt_parallel_arg"],
)
def test_typos_are_refused_in_one_line_with_the_nearest_name(tmp_path, monkeypatch, capsys, extra, first_line):
    from veomni_lightning.cli import build_cli

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        build_cli(["fit", "--config", str(TINY_CONFIG), *extra, "--print_config"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines()[0] == first_line, err
    assert len(err.splitlines()) <= 3, err  # no usage dump


def test_single_train_file_is_accepted(tmp_path, monkeypatch, capsys):
    from veomni_lightning.cli import build_cli

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        build_cli(["fit", "--config", str(TINY_CONFIG), "--data.train_files", "data.jsonl", "--print_config"])
    assert info.value.code == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["data"]["init_args"]["train_files"] in ("data.jsonl", ["data.jsonl"])


def test_fit_help_lists_models_and_data_and_their_arguments_resolve(tmp_path, monkeypatch, capsys):
    from veomni_lightning.cli import build_cli

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        build_cli(["fit", "--help"])
    out = capsys.readouterr().out
    assert "  CausalLMModule " in out and "  TextDataModule " in out and "--model.help NAME" in out
    with pytest.raises(SystemExit):
        build_cli(["fit", "--data.help", "TextDataModule"])
    out = capsys.readouterr().out
    # Per-argument descriptions come from the docstrings.
    assert "--data.train_files" in out and "one path or a list" in out
    with pytest.raises(SystemExit):
        build_cli(["fit", "--model.help", "CausalLMModule"])
    out = capsys.readouterr().out
    assert "--model.learning_rate" in out and "AdamW's peak learning rate" in out


# A bad setting or a bad first data row fails before the model is built: the console entry point, with the
# model build replaced by a tripwire.
_TRIPWIRE = (
    "import sys; import veomni_lightning.modules.base as base\n"
    "def tripwire(self): raise AssertionError('MODEL BUILT')\n"
    "base.TrainingModule.configure_model = tripwire\n"
    "from veomni_lightning.cli import main\n"
    "sys.argv[0] = 'veomni-lightning'; main()\n"
)


@pytest.mark.parametrize(
    "case, expected",
    [
        ("negative_lr", "error: learning_rate must be a positive number"),
        ("bad_first_row", "bad.jsonl line 2: invalid JSON (Unterminated string starting at, column 10)"),
    ],
)
def test_bad_input_fails_before_the_model_is_built(tmp_path, case, expected):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "no end}')
    extra = ["--model.init_args.learning_rate=-1e-4"] if case == "negative_lr" else ["--data.train_files", str(bad)]
    _assert_refused_before_model_build(tmp_path, extra, expected)


def _assert_refused_before_model_build(cwd: Path, extra: list[str], expected: str) -> None:
    """The command (in a subprocess: it sets up a process group) exits 1 with one ``error:`` line, no model built."""
    args = ["fit", "--config", str(TINY_CONFIG), "--trainer.max_steps", "1", *extra]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    proc = subprocess.run(
        [sys.executable, "-c", _TRIPWIRE, *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 1, proc.stderr[-4000:]
    assert "MODEL BUILT" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-4000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], proc.stderr[-4000:]


def test_export_folder_in_use_is_refused_before_training(tmp_path):
    taken = tmp_path / "hf"
    taken.mkdir()
    (taken / "model.safetensors").write_text("a previous export")
    extra = ["--trainer.callbacks+", "veomni_lightning.callbacks.HFExport"]
    extra += ["--trainer.callbacks.init_args.dirpath", str(taken)]
    _assert_refused_before_model_build(tmp_path, extra, f"the export folder {taken} already holds a previous export")
    assert (taken / "model.safetensors").read_text() == "a previous export"


def test_impossible_layout_from_cli(tmp_path, monkeypatch):
    # sp=3 on one process: the strategy's layout check names the sizes before any process group exists.
    from veomni_lightning.cli import build_cli
    from veomni_lightning.parallel.dims import ParallelLayoutError

    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(TINY_CONFIG), "--trainer.strategy.parallel.sp_size", "3", "--trainer.max_steps", "1"]
    args += ["--trainer.default_root_dir", str(tmp_path / "logs"), "--trainer.enable_progress_bar", "false"]
    with pytest.raises(ParallelLayoutError, match=r"world size 1 is not divisible by dp_replicate \(1\) × sp \(3\)"):
        build_cli(args)


# ---------------------------------------------------------------------------------------------------------------------
# The README's main job
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_readme_main_job(tmp_path):
    # The README's command verbatim, run in a fresh folder: everything lands in outputs/smollm2_135m_cpu/version_0.
    proc = _run_cli(["fit", "--config", str(MAIN_CONFIG)], tmp_path, 900)
    assert proc.returncode == 0, proc.stderr[-6000:]
    run = tmp_path / "outputs" / "smollm2_135m_cpu" / "version_0"
    assert sorted(p.name for p in run.parent.iterdir()) == ["version_0"]
    logs, ckpts, hf = run, run / "checkpoints", run / "hf"
    assert not [text for text in NOISE if text in proc.stderr], proc.stderr[-4000:]

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
    umask = os.umask(0)
    os.umask(umask)
    for path in [*saved[0].iterdir(), *hf.iterdir()]:
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, (path, oct(path.stat().st_mode))

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
