"""``karl-verl``: one command line with subcommands.

Each subcommand lives in ``karl_verl/commands/<name>.py`` and defines ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int`` (the exit status). Modules are imported only
when their subcommand runs, so ``karl-verl --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

#: subcommand -> module; the module's HELP is shown in ``karl-verl --help``.
COMMANDS: dict[str, str] = {
    "info": "karl_verl.commands.info",
    "data": "karl_verl.commands.data",
    "eval": "karl_verl.commands.eval",
    "probe": "karl_verl.commands.probe",
    "dryrun": "karl_verl.commands.dryrun",
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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
