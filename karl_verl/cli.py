"""``karl-verl``: one command line with subcommands.

Each subcommand lives in ``karl_verl/commands/<name>.py`` and defines ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int`` (the exit status). Modules are imported only
when their subcommand runs, so ``karl-verl --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import warnings
from collections.abc import Sequence

#: subcommand -> module; the module's HELP is shown in ``karl-verl --help``.
COMMANDS: dict[str, str] = {
    "info": "karl_verl.commands.info",
    "data": "karl_verl.commands.data",
    "eval": "karl_verl.commands.eval",
    "probe": "karl_verl.commands.probe",
    "dryrun": "karl_verl.commands.dryrun",
    "experiment": "karl_verl.commands.experiment",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="karl-verl", description="KARL for verl: tools around a training run.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        command = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(command)
        command.set_defaults(_run=module.run)
    return parser


class _DropVerlPlatformNotices(logging.Filter):
    """verl's platform layer warns on every CPU-only machine that it falls back to CUDA."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        return not (message.startswith("No supported accelerator detected")
                    or "is registered but not available" in message)


def quiet_verl_import_notices() -> None:
    """Keep verl's import-time notices (accelerator fallback, optional engines missing) from the user.

    They say nothing about what a karl-verl command does, and on a CPU machine they are all the user
    would otherwise see. A logging filter, not a level: verl sets its loggers' levels when imported.
    """
    platform_logger = logging.getLogger("verl.plugin.platform.platform_manager")
    if not any(isinstance(f, _DropVerlPlatformNotices) for f in platform_logger.filters):
        platform_logger.addFilter(_DropVerlPlatformNotices())
    warnings.filterwarnings("ignore", message=r"\w+ engine is not available", category=UserWarning)


def main(argv: Sequence[str] | None = None) -> int:
    quiet_verl_import_notices()
    args = build_parser().parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
