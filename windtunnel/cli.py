"""`windtunnel` command line: a table of subcommands, each imported only when used.

Each subcommand module exposes `add_arguments(parser)` and `run(args) -> int`. Importing torch,
mlflow or ray takes seconds, so `windtunnel --help` imports none of them.
"""
from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys

from windtunnel.errors import ConfigError
from windtunnel.executors import ExecutorGone

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "trial": ("windtunnel.commands.trial", "train one trial from config overrides and print its result"),
    "coord-check": ("windtunnel.commands.coord_check", "muP coordinate check across widths (sp vs mup)"),
    "data": ("windtunnel.commands.data", "prepare token shards from text (`data prepare`)"),
    "sweep": ("windtunnel.commands.sweep", "run or resume a sweep: Optuna search, executors, MLflow"),
    "report": ("windtunnel.commands.report", "regenerate a sweep's tables, plots and report.md"),
    "confirm": ("windtunnel.commands.confirm", "re-run a sweep's best configurations with n seeds: means, 95% intervals, ties"),
    "sync": ("windtunnel.commands.sync", "send tracking records a sweep could not deliver to MLflow"),
    "ui": ("windtunnel.commands.ui", "open the MLflow UI of a results dir on 127.0.0.1"),
    "fit": ("windtunnel.commands.fit", "fit a law: lr-transfer, batch-size, horizon, scaling-law, wsd"),
    "transfer": ("windtunnel.commands.transfer", "rescale the winners to a target shape and export launchable configs"),
    "train": ("windtunnel.commands.train", "the large-run trainer (torchrun, FSDP2, WSD, resume)"),
    "export-hf": ("windtunnel.commands.export_hf", "a checkpoint as a Hugging Face Llama folder (safetensors, tokenizer)"),
}


class _Parser(argparse.ArgumentParser):
    """Bad flags are one line, as every other bad input is (argparse prints its usage block first)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def add_argument(self, *args, **kwargs):
        # argparse (3.11) names an absent nargs="*" positional without a default among the required
        # ones ("required: sweep, KEY=VALUE") when another positional is missing
        if kwargs.get("nargs") == "*" and args and not args[0].startswith("-"):
            kwargs.setdefault("default", [])
        return super().add_argument(*args, **kwargs)


def _top_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="windtunnel",
        description="muP hyperparameter wind tunnel: search tiny models, fit the laws, transfer the winners.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n" + "\n".join(f"  {n:<12} {h}" for n, (_, h) in COMMANDS.items())
        + "\n\nRun `windtunnel COMMAND --help` for a command's options; `windtunnel --version` for the version.\n"
        "An error that names a file stops with one line; WINDTUNNEL_DEBUG=1 shows its traceback.",
    )
    p.add_argument("command", choices=list(COMMANDS), metavar="COMMAND")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        _top_parser().print_help()
        return 0
    if argv[0] == "--version":
        from importlib.metadata import version

        print(f"windtunnel {version('windtunnel')}")
        return 0
    if argv[0] not in COMMANDS:
        _top_parser().error(f"unknown command {argv[0]!r}; allowed: {', '.join(COMMANDS)}")
    name = argv[0]
    module_name, help_text = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = _Parser(prog=f"windtunnel {name}", description=help_text)
    module.add_arguments(parser)
    args = parser.parse_intermixed_args(argv[1:])  # flags may come between KEY=VALUE overrides
    try:
        return int(module.run(args) or 0)
    except ConfigError as e:
        _say(f"windtunnel {name}: error: {e}")
        return 2
    except KeyboardInterrupt:
        _say(f"windtunnel {name}: interrupted")
        return 130
    except ExecutorGone as e:
        _say(f"windtunnel {name}: error: {e}")
        return 1
    except OSError as e:  # a path the user gave that cannot be read or written: no traceback
        if e.errno == errno.ENOSPC and e.filename is None and not os.environ.get("WINDTUNNEL_DEBUG"):
            _say(f"windtunnel {name}: error: no space left on device; free some and run the same command again")
            return 1
        if e.filename is None or os.environ.get("WINDTUNNEL_DEBUG"):
            raise
        where = f"{e.filename} -> {e.filename2}" if e.filename2 else e.filename
        _say(f"windtunnel {name}: error: {where}: {e.strerror or e}")
        return 1


def _say(line: str) -> None:
    """One write per line: print() makes two (text, then newline), and under torchrun every rank's
    line would interleave with the others' on the shared stderr."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


if __name__ == "__main__":
    sys.exit(main())
