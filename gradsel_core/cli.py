"""``gradsel`` command line. Each subcommand lives in ``gradsel_core.commands.<module>`` and exposes
``add_arguments(parser)`` and ``run(args) -> int``; modules are imported only when their command runs."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import List, Optional

from .errors import GradselError, UsageError

# command -> (module under gradsel_core.commands, one-line help)
COMMANDS = {
    "demo": ("demo", "run the safety-drift experiment on the synthetic testbed (the main job)"),
    "score": ("score", "score a dataset into a resumable score store"),
    "reference": ("reference", "compute a reference gradient (mean over reference data) for alignment scores"),
    "inspect": ("inspect", "summarise a score store, with a norm histogram"),
    "select": ("select", "select samples from a score store with a policy"),
    "repair": ("repair", "rebuild a score store's manifest.json from its shards"),
    "train": ("train", "run the continual trainer from a JSON config"),
}


def _available():
    found = {}
    for name, (module, help_text) in COMMANDS.items():
        if importlib.util.find_spec(f"gradsel_core.commands.{module}") is not None:
            found[name] = (module, help_text)
    return found


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """``--help`` shows each option's default, unless its help text states it already or there is none to
    show (a flag, ``None``); descriptions and epilogs are printed as written (tables, examples)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or action.default in (None, False, [], argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


def _version() -> str:
    from . import __version__

    return f"gradsel {__version__}"


def build_parser(only: Optional[str] = None) -> argparse.ArgumentParser:
    """The parser; with ``only`` (a command name) just that subcommand's module is imported and gets its
    options (the others are listed by name and help), so ``gradsel --help`` and ``gradsel select ...``
    import nothing they do not use (no torch)."""
    parser = argparse.ArgumentParser(
        prog="gradsel", description="Exact per-sample gradient norms and gradient-based sample selection.",
        formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=_version())
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    subparsers = {}
    for name, (module, help_text) in _available().items():
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
        subparsers[name] = p
        if only is not None and name != only:
            continue
        mod = importlib.import_module(f"gradsel_core.commands.{module}")
        mod.add_arguments(p)
        for action in p._actions:  # an option without help text still shows its default
            if action.help is None and action.option_strings and action.default not in (None, False, []):
                action.help = "(default: %(default)s)"
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the full traceback of an error")
        p.set_defaults(_run=mod.run)
    parser.set_defaults(_subparsers=subparsers)
    return parser


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the record (not the stream of the first call)."""

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def setup_logging(level: int) -> None:
    """One stderr handler on the root logger (``LEVEL name: message``), installed once per process."""
    root = logging.getLogger()
    handler = next((h for h in root.handlers if isinstance(h, _StderrHandler)), None)
    if handler is None:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(level)


# errors a user can act on: one line, exit 2, no traceback (unless --debug)
USER_ERRORS = (GradselError, ValueError, TypeError, OSError, KeyError, UnicodeDecodeError)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(only=next((a for a in argv if not a.startswith("-")), ""))
    args, extra = parser.parse_known_args(argv)
    if extra:  # an unknown flag: the subcommand's usage, not the top-level one
        sub = args._subparsers.get(args.command)
        (sub or parser).error(f"unrecognized arguments: {' '.join(extra)}")
    setup_logging(logging.DEBUG if args.verbose else logging.INFO)
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print(f"gradsel {args.command}: interrupted", file=sys.stderr)
        return 130
    except SystemExit as e:  # a command's `raise SystemExit("message")` gets the one error style too
        if not isinstance(e.code, str) or args.debug:
            raise
        return report_error(args.command, UsageError(e.code))
    except Exception as e:  # noqa: BLE001 - the one place errors become a message and an exit code
        if args.debug:
            raise
        return report_error(args.command, e)


def report_error(command: str, e: BaseException) -> int:
    """Print ``gradsel <cmd>: error: <cause>`` on stderr; 2 for errors a user can fix, 1 for the rest."""
    known = isinstance(e, USER_ERRORS) or type(e).__name__ in ("StoreError", "StoreConflictError", "UnsupportedModule")
    cause = str(e) if known and str(e) else f"{type(e).__name__}: {e}"
    if isinstance(e, KeyError) and known:
        cause = f"missing key {e}"
    hint = "" if known else " (an internal error: rerun with --debug for the traceback, and report it)"
    print(f"gradsel {command}: error: {cause}{hint}", file=sys.stderr)
    return 2 if known else 1


if __name__ == "__main__":
    sys.exit(main())
