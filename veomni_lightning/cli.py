"""The ``veomni-lightning`` command: LightningCLI with the library's strategies, progress and output layout.

``veomni-lightning fit --config configs/text/tiny_qwen3_cpu.yaml`` trains; ``--print_config`` shows the resolved
configuration; ``fit --help`` lists the models and data modules and how to see their arguments. Model and data are
given by ``class_path`` in the yaml (any LightningModule / LightningDataModule), so every family uses this command.

What it adds to LightningCLI, all for the first hour of a new user:

* every output of a run lands in one versioned run folder, ``<trainer.default_root_dir>/version_<N>/`` (metrics,
  config, checkpoints, the HF export): runs never overwrite each other, and ``--trainer.default_root_dir`` moves all;
* no abbreviated options (``--trainer.max_step`` is refused, not taken for ``max_steps``), and a misspelt option is
  reported in one line with the nearest valid name, before any usage text;
* :class:`~veomni_lightning.callbacks.StepProgress` (plain lines when the output is not a terminal);
* errors in what the user gave (:class:`~veomni_lightning.errors.ConfigError`) printed once, as one line;
* Lightning's and torch's notices that say nothing about the run silenced by exact message (see :data:`QUIET`).
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import re
import sys
import warnings
from typing import Any

import lightning.pytorch as pl
from jsonargparse import DefaultHelpFormatter
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger

import veomni_lightning.data  # noqa: F401  (short class names on the command line: --data.help TextDataModule)
import veomni_lightning.modules  # noqa: F401
import veomni_lightning.strategies  # noqa: F401  (registers the "veomni" strategy)
from veomni_lightning.callbacks import StepProgress
from veomni_lightning.errors import ConfigError
from veomni_lightning.modules import TrainingModule

__all__ = ["VeOmniCLI", "build_cli", "main", "QUIET"]

#: Warnings silenced by the command, each by category and the start of its exact message; all are upstream notices
#: about upstream code that a user cannot act on (ours are fixed at the cause instead).
QUIET: list[tuple[type[Warning], str]] = [
    # lightning's own pytree helper on torch >= 2.10
    (UserWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),
    # ModelCheckpoint with manual optimisation: our checkpoint at step s holds the state after step s, as resuming
    # needs; the warning proposes saving a pre-step copy of the weights instead.
    (UserWarning, r"Using ModelCheckpoint with manual optimization and every_n_train_steps"),
    # Every TrainingModule can validate; a run without val_files simply has no validation.
    (UserWarning, r"You defined a `validation_step` but have no `val_dataloader`"),
]

#: Lightning info messages (not warnings) that only advertise products.
_QUIET_INFO_PREFIXES = ("💡 Tip:",)


def _ours(base: type) -> list[type]:
    """The library's concrete subclasses of ``base`` (imported above), in name order."""
    found, stack = set(), [base]
    while stack:
        for cls in stack.pop().__subclasses__():
            stack.append(cls)
            if cls.__module__.startswith("veomni_lightning.") and not cls.__name__.startswith("_"):
                found.add(cls)
    return sorted(found - {TrainingModule}, key=lambda c: c.__name__)


def _summary(cls: type) -> str:
    first = (cls.__doc__ or "").strip().split("\n\n")[0]
    return " ".join(first.split()).split(". ")[0].rstrip(".")


def guide() -> str:
    """The end of ``fit --help``: the library's models and data modules and how to see their arguments."""
    lines = ["Models (--model NAME, then --model.init_args.ARG; their arguments: --model.help NAME):"]
    lines += [f"  {c.__name__:<18} {_summary(c)}" for c in _ours(TrainingModule)]
    lines += ["Data (--data NAME; their arguments: --data.help NAME):"]
    lines += [f"  {c.__name__:<18} {_summary(c)}" for c in _ours(pl.LightningDataModule)]
    lines += [
        "Parallelism: --trainer.strategy.help VeOmniStrategy; e.g. --trainer.devices 8 "
        "--trainer.strategy.parallel.sp_size 2",
        "Outputs: one folder per run, <trainer.default_root_dir>/version_N/ (metrics.csv, config.yaml, checkpoints/,"
        " hf/)",
        "Example: veomni-lightning fit --config configs/text/tiny_qwen3_cpu.yaml --model.init_args.learning_rate 3e-4",
    ]
    return "\n".join(lines) + "\n"


class _InfoFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(_QUIET_INFO_PREFIXES)


def quiet_upstream_notices() -> None:
    """Install the :data:`QUIET` warning filters and drop Lightning's product tips (this process only)."""
    for category, message in QUIET:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_InfoFilter())


class StrictArgumentParser(LightningArgumentParser):
    """LightningCLI's parser without option abbreviations, reporting a bad option in one line with a suggestion."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def error(self, message: str, ex: Exception | None = None) -> Any:
        if not self.exit_on_error or os.environ.get("JSONARGPARSE_DEBUG"):
            return super().error(message, ex)  # internal parse attempts catch this; keep jsonargparse's behaviour
        parser = getattr(ex, "subcommand_parser", None) or self
        first = _first_line(message, parser)
        sys.stderr.write(f"error: {first}\n")
        rest = message.strip().splitlines()[1:]
        if first == message.strip().splitlines()[0] and rest:  # not one we summarised: keep jsonargparse's detail
            sys.stderr.write("\n".join(rest) + "\n")
        prog = parser.prog.replace(" [options]", "")
        sys.stderr.write(f"See `{prog} --help` for the accepted options.\n")
        raise SystemExit(2)


def _first_line(message: str, parser: LightningArgumentParser) -> str:
    """The one line that matters in a jsonargparse error, with the nearest valid name for a misspelt key."""
    unrecognized = re.search(r"unrecognized arguments: (--[\w.]+)", message)
    if unrecognized:
        given = unrecognized.group(1)
        known = [opt for action in parser._actions for opt in action.option_strings if opt.startswith("--")]
        return f"unknown option {given}{_suggest(given, known)}"
    not_accepted = re.findall(
        r"Problem with given class_path '([\w.]+)':\s*\n\s*Option '([\w.]+)' is not accepted", message
    )
    if not_accepted:
        class_path, key = not_accepted[0]
        return f"{class_path.rsplit('.', 1)[-1]} has no argument '{key}'{_suggest(key, _init_arg_names(class_path))}"
    return message.strip().splitlines()[0]


def _suggest(given: str, known: list[str]) -> str:
    close = difflib.get_close_matches(given, known, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _init_arg_names(class_path: str) -> list[str]:
    """Keyword arguments a class accepts, including those it passes to its bases through ``**kwargs``."""
    import importlib
    import inspect

    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return []
    names: list[str] = []
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        names += [p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name != "self"]
    return names


class _GuideFormatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """jsonargparse's help layout, keeping the line breaks of the ``fit --help`` guide."""


class VeOmniCLI(LightningCLI):
    """LightningCLI for every veomni-lightning family (subclass mode: the yaml names the model and data classes)."""

    def __init__(self, args: list[str] | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("parser_class", StrictArgumentParser)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        # StepProgress's first line gives the parameter counts; Lightning's table would add a "Total FLOPs: 0" row
        # (it counts FLOPs only with an example input, which an LLM module has no use for).
        kwargs.setdefault("trainer_defaults", {"enable_model_summary": False})
        # The modules build their own optimizer and schedule (TrainingModule); --optimizer would silently replace it.
        kwargs.setdefault("auto_configure_optimizers", False)
        # Subcommand parsers inherit the main parser's formatter.
        kwargs.setdefault("parser_kwargs", {"formatter_class": _GuideFormatter, "fit": {"epilog": guide()}})
        super().__init__(pl.LightningModule, pl.LightningDataModule, args=args, **kwargs)

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        """The Trainer, with a CSV logger in ``default_root_dir`` and :class:`StepProgress` unless configured."""
        config = self._get(self.config_init, "trainer", default={})
        if config.get("logger") in (None, True):
            # Metrics, config.yaml, checkpoints/ and hf/ all go to this logger's version_<N> folder.
            kwargs["logger"] = CSVLogger(save_dir=config.get("default_root_dir") or os.getcwd(), name="")
        callbacks = config.get("callbacks") or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        wants_bar = config.get("enable_progress_bar") is not False
        if wants_bar and not any(isinstance(cb, ProgressBar) for cb in callbacks):
            kwargs["callbacks"] = [*callbacks, StepProgress()]
        return super().instantiate_trainer(**kwargs)


def build_cli(args: list[str] | None = None) -> VeOmniCLI:
    """Parse ``args`` (default ``sys.argv``) and run the subcommand; returns the CLI (tests inspect it)."""
    return VeOmniCLI(args=args)


def _is_rank_zero() -> bool:
    return all(os.environ.get(name, "0") == "0" for name in ("RANK", "LOCAL_RANK", "NODE_RANK"))


def main(args: list[str] | None = None) -> None:
    """Console-script entry point ``veomni-lightning``: a :class:`ConfigError` is one line on stderr, exit code 1."""
    quiet_upstream_notices()
    try:
        build_cli(args)
    except Exception as exc:
        error = _config_error_in(exc)
        if error is None:
            raise
        if _is_rank_zero():
            sys.stderr.write(f"error: {error}\n")
        raise SystemExit(1) from None


def _config_error_in(exc: BaseException) -> ConfigError | None:
    """The :class:`ConfigError` that caused ``exc`` (jsonargparse wraps errors raised while instantiating)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, ConfigError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


if __name__ == "__main__":
    main()
