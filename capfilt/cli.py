"""The `capfilt` command line: the commands each module of `capfilt.commands` lists in `COMMANDS`."""

from __future__ import annotations

import importlib
import pkgutil

import typer

import capfilt.commands
from capfilt.commands._shared import handled

app = typer.Typer(
    name="capfilt",
    help="BLIP CapFilt at scale: caption and filter web image-text pairs, then re-pretrain.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
app.callback()(lambda: None)  # stay a command group (`capfilt CMD`) even with one command registered

# Command modules keep heavy imports inside the commands, so `capfilt --help` answers at once.
for _module in sorted(m.name for m in pkgutil.iter_modules(capfilt.commands.__path__) if not m.name.startswith("_")):
    for _name, _command in importlib.import_module(f"capfilt.commands.{_module}").COMMANDS.items():
        app.command(_name)(handled(_command))


if __name__ == "__main__":
    app()
