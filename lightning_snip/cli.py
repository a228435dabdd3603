"""Short, parse-time errors for ``SNIPPruning`` options in a LightningCLI config.

LightningCLI (jsonargparse) checks each value's type while it parses, but a wrong callback option is reported under
the whole usage text and a list of union subtypes, and a combination of options that only ``SNIPPruning.__init__``
can judge (``scope: "2:3"`` with ``sparsity: 0.9``) surfaces as a traceback from inside instantiation. With
:class:`SNIPCLIMixin` in front of ``LightningCLI``, both become one line that leads with this project's message:

    error: trainer.callbacks[0] (lightning_snip.SNIPPruning): `scope='2:3'` keeps 2 of every 3 weights, so ...

Use it in place of ``LightningCLI``, or in front of it in your own subclass (either Lightning namespace)::

    from lightning.pytorch.cli import LightningCLI
    from lightning_snip.cli import SNIPCLIMixin

    class MyCLI(SNIPCLIMixin, LightningCLI): ...

This module needs jsonargparse, which LightningCLI itself needs (``pip install "lightning[pytorch-extra]"``).
"""

from __future__ import annotations

import contextlib
import io
import re
import sys
from typing import Any

from lightning_snip.callback import SNIPPruning

_CLASS_PATH = re.compile(r"Problem with given class_path '([\w.]+)':")
_KEY = re.compile(r'Parser key "([\w.]+)":')
_NOT_OF_TYPE = re.compile(r"^Not of type \w+: (?=`)")


def short_error(message: str) -> str:
    """The line that matters in a jsonargparse error about a ``SNIPPruning`` option, or ``message`` unchanged.

    Args:
        message: The text of jsonargparse's ``ArgumentError``.

    Returns:
        ``"<config key> (<class path>): `<option>`: <reason>"`` when the error names an option of ``SNIPPruning`` (or
        a subclass), the reason being the project's own message where there is one; otherwise ``message``.
    """
    lines = message.splitlines()
    for number, line in enumerate(lines):
        found = _CLASS_PATH.search(line)
        if found is None or not _is_snip(found.group(1)):
            continue
        outer = _KEY.search(lines[0]) if lines else None
        where = f"{outer.group(1)} ({found.group(1)})" if outer else found.group(1)
        rest = [text.strip() for text in lines[number + 1 :]]
        for index, text in enumerate(rest[:-1]):
            key = _KEY.search(text)
            if key is not None:
                reason = _NOT_OF_TYPE.sub("", rest[index + 1])
                return f"{where}: `{key.group(1)}`: {reason}" if not reason.startswith("`") else f"{where}: {reason}"
        return f"{where}: {rest[0]}" if rest else message
    return message


def _is_snip(class_path: str) -> bool:
    module, _, name = class_path.rpartition(".")
    try:
        target = getattr(__import__(module, fromlist=[name]), name)
    except (ImportError, AttributeError):
        return False
    return isinstance(target, type) and issubclass(target, SNIPPruning)


def check_snip_callbacks(config: Any) -> None:
    """Build every ``SNIPPruning`` a parsed LightningCLI config names, to check option combinations early.

    Runs before anything else is instantiated; the callbacks built here are discarded.

    Args:
        config: The parsed config of one subcommand (a jsonargparse ``Namespace`` with ``trainer.callbacks``).

    Raises:
        ValueError: ``SNIPPruning``'s own message, prefixed with the config key of the callback.
    """
    trainer = getattr(config, "trainer", None)
    callbacks = getattr(trainer, "callbacks", None)
    if callbacks is None:
        return
    for index, spec in enumerate(callbacks if isinstance(callbacks, list) else [callbacks]):
        class_path = getattr(spec, "class_path", None)
        if not isinstance(class_path, str) or not _is_snip(class_path):
            continue
        init_args = getattr(spec, "init_args", None)
        kwargs = dict(vars(init_args)) if init_args is not None else {}
        module, _, name = class_path.rpartition(".")
        cls = getattr(__import__(module, fromlist=[name]), name)
        try:
            cls(**kwargs)
        except (TypeError, ValueError) as error:
            raise ValueError(f"trainer.callbacks[{index}] ({class_path}): {error}") from error


class SNIPCLIMixin:
    """Put in front of ``LightningCLI``: a wrong ``SNIPPruning`` option is a one-line error at parse time.

    Parse errors print ``error: <the line that matters>`` and a tip to run ``--help`` (instead of the whole usage), and
    every ``SNIPPruning`` in the config is checked as a whole before the trainer or the model is built. The exit
    status is 2, as for any parse error.
    """

    def parse_arguments(self, parser: Any, args: Any) -> None:
        """Parse as ``LightningCLI`` does, with jsonargparse's error shortened to the line that matters."""
        printed = io.StringIO()
        try:
            with contextlib.redirect_stderr(printed):
                super().parse_arguments(parser, args)  # type: ignore[misc]
        except SystemExit as stop:
            text = printed.getvalue()
            _, found, message = ("\n" + text).partition("\nerror: ")
            if stop.code == 2 and found:
                sys.stderr.write(f"error: {short_error(message.rstrip())}\ntip: run with --help for the options\n")
            else:
                sys.stderr.write(text)
            raise
        sys.stderr.write(printed.getvalue())
        subcommand = getattr(self.config, "subcommand", None)  # type: ignore[attr-defined]
        try:
            check_snip_callbacks(self.config[subcommand] if subcommand else self.config)  # type: ignore[attr-defined]
        except ValueError as error:
            parser.exit(2, f"error: {error}\n")
