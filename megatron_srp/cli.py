"""The one command-line convention of ``tools/*.py``, so that every tool is driven the same way.

Every tool accepts ``--config FILE``, ``key=value`` overrides and ``--no-progress``; tools that
print figures also take ``--json FILE``. Two kinds of tool share these spellings:

- a tool whose settings are a config dataclass (pretrain_srp, evaluate_srp, ...) reads
  ``--config`` and the overrides with its own loader (``megatron_srp.config``); this module
  only adds the arguments (``add_common_args(parser, config_help=..., options=False)``).
- a tool whose settings are flags (``options=True``, the default) gets them from three more
  places: ``--config FILE`` is a YAML mapping of its option names (a flag's ``dest``:
  ``max_new_tokens: 32``; dashes accepted), ``key=value`` sets one option. Precedence:
  defaults < ``--config`` < explicit flags < ``key=value``. ``parse_args`` does the merge,
  checks required options after it, and names the key and its source on any error.

Values from a file or ``key=value`` are YAML: ``workers=2`` is an int, ``variants=[raw,srp]`` a
list. A list given to a flag that takes one value becomes a comma-separated string (the form
``--variants raw,srp`` takes); a scalar given to a repeatable flag becomes a one-item list; a
mapping given to a repeatable ``KEY=VALUE`` flag becomes its ``KEY=VALUE`` items; ``null`` is
the option's default. For a text option the command line's text is kept as typed.

``tool_main`` turns a usage or configuration error into exit code 2 with one ``error: ...``
line on stderr (no traceback); a failure of the work itself stays an exception or exit 1.
``progress_wanted(args)``: draw progress bars only without ``--no-progress`` and on a terminal.
``append_json(path, data)``: the meaning of ``--json FILE`` everywhere, one strict JSON line.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import yaml

from megatron_srp.config import ConfigError
from megatron_srp.units import json_safe

__all__ = ["UsageError", "add_common_args", "parse_args", "progress_wanted", "append_json",
           "tool_main", "USAGE_ERRORS"]

OPTIONS_EPILOG = """\
options from a file or the command line:
  --config FILE   a YAML mapping of this tool's option names, e.g. {example}: ...
  key=value       one option, e.g. {example}=... (values are YAML: 2 is an int, [a,b] a list)
  precedence      defaults < --config < explicit flags < key=value"""

_NOT_SETTINGS = {"help", "version", "config", "overrides"}


class UsageError(ValueError):
    """A command line or option file that cannot run: the tool exits 2 with this message."""


#: What ``tool_main`` reports as a usage error (exit 2). ``ConfigError`` covers the typed
#: configs' loading and validation; FileNotFoundError a file the user named that is not there.
USAGE_ERRORS = (UsageError, ConfigError, yaml.YAMLError, FileNotFoundError)


# -- building a parser ---------------------------------------------------------------------------

def add_common_args(parser: argparse.ArgumentParser, *, options: bool = True,
                    config_help: Optional[str] = None, config_required: bool = False,
                    overrides_help: Optional[str] = None, json_help: Optional[str] = None,
                    example: Optional[str] = None,
                    config_repeats: bool = False) -> argparse.ArgumentParser:
    """Add ``--config``, the ``key=value`` positional, ``--no-progress`` and (with
    ``json_help``) ``--json FILE`` to ``parser``.

    ``options=True``: the tool's settings are its flags, and ``parse_args`` merges ``--config``
    and ``key=value`` into them (``example`` names one option for the help text).
    ``options=False``: the tool reads ``args.config`` and ``args.overrides`` itself;
    ``config_repeats``: ``--config`` may be given several times (``args.config`` is a list).
    """
    parser.add_argument(
        "--config", metavar="FILE", required=config_required,
        action="append" if config_repeats else "store",
        help=config_help or "YAML mapping of this tool's options (the names key=value takes)")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value",
        help=overrides_help or "set one option, e.g. "
        + (f"{example}=VALUE" if example else "name=VALUE") + " (wins over flags and --config)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars (there are none when stderr is not a terminal)")
    if json_help is not None:
        parser.add_argument("--json", metavar="FILE",
                            help=json_help or "append the figures as one JSON line to FILE")
    if options:
        parser._srp_options = True  # type: ignore[attr-defined]
        if parser.epilog is None:
            parser.epilog = OPTIONS_EPILOG.format(example=example or "option_name")
            if parser.formatter_class is argparse.HelpFormatter:
                parser.formatter_class = argparse.RawDescriptionHelpFormatter
    return parser


# -- parsing -------------------------------------------------------------------------------------

def parse_args(parser: argparse.ArgumentParser,
               argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """``parser.parse_args``, with ``key=value`` items allowed anywhere among the flags, and for
    an options tool (``add_common_args(options=True)``) the ``--config`` / ``key=value`` merge.

    Raises ``UsageError`` for an unknown key, a value of the wrong type, a missing required
    option; argparse's own usage errors exit 2 as always."""
    argv = list(sys.argv[1:] if argv is None else argv)
    required = {id(p): _relax_required(p) for p in _all_parsers(parser)
                if getattr(p, "_srp_options", False)}
    args = _parse(parser, argv)
    chain = _active_chain(parser, args)
    leaf = chain[-1]
    if not getattr(leaf, "_srp_options", False):
        return args
    actions = {a.dest: a for p in chain for a in p._actions
               if a.option_strings and a.dest not in _NOT_SETTINGS
               and not isinstance(a, argparse._HelpAction)}
    layers: dict[str, tuple[Any, Optional[str], str]] = {}
    if args.config:
        for key, value in _read_option_file(args.config, actions).items():
            layers[key] = (value, None, str(args.config))
    for dest in _explicit_dests(parser, argv):
        layers.pop(dest, None)  # an explicit flag beats the file
    for key, (value, raw) in _read_option_items(args.overrides, actions).items():
        layers[key] = (value, raw, "command line")
    for dest, (value, raw, source) in layers.items():
        setattr(args, dest, _convert(actions[dest], dest, value, raw, source))
    args.overrides = []
    for p in chain:
        _check_required(p, args, required.get(id(p), ([], [])))
    return args


def _all_parsers(parser: argparse.ArgumentParser) -> Iterable[argparse.ArgumentParser]:
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                yield from _all_parsers(sub)


def _active_chain(parser: argparse.ArgumentParser,
                  args: argparse.Namespace) -> list[argparse.ArgumentParser]:
    chain = [parser]
    while True:
        subs = [a for a in chain[-1]._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or getattr(args, subs[0].dest, None) is None:
            return chain
        chain.append(subs[0].choices[getattr(args, subs[0].dest)])


def _parse(parser: argparse.ArgumentParser, argv: list[str],
           namespace: Optional[argparse.Namespace] = None) -> argparse.Namespace:
    if any(isinstance(a, argparse._SubParsersAction) for a in parser._actions):
        return parser.parse_args(argv, namespace)
    return parser.parse_intermixed_args(argv, namespace)


def _relax_required(parser: argparse.ArgumentParser) -> tuple[list, list]:
    """Make required flags optional for argparse (they may come from --config or key=value);
    ``_check_required`` asks for them after the merge. Idempotent."""
    if hasattr(parser, "_srp_required"):
        return parser._srp_required  # type: ignore[attr-defined]
    actions = [a for a in parser._actions if a.option_strings and a.required]
    groups = [g for g in parser._mutually_exclusive_groups if g.required]
    for a in actions:
        a.required = False
        a.help = f"{a.help} [required]" if a.help else "[required]"
    for g in groups:
        g.required = False
    parser._srp_required = (actions, groups)  # type: ignore[attr-defined]
    return actions, groups


def _explicit_dests(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The dests the command line gave as flags: argv parsed again with every default
    suppressed, so only what was given lands in the namespace."""
    saved_defaults = [(p, p._defaults) for p in _all_parsers(parser)]
    saved_actions = [(a, a.default) for p in _all_parsers(parser) for a in p._actions
                     if a.option_strings]
    try:
        for p, _ in saved_defaults:
            p._defaults = {}
        for a, _ in saved_actions:
            a.default = argparse.SUPPRESS
        given = vars(_parse(parser, argv))
    finally:
        for p, defaults in saved_defaults:
            p._defaults = defaults
        for a, default in saved_actions:
            a.default = default
    return set(given)


def _valid_keys(actions: dict[str, argparse.Action]) -> str:
    return ", ".join(sorted(actions))


def _key(key: Any, actions: dict[str, argparse.Action], source: str) -> str:
    dest = str(key).replace("-", "_")
    if dest not in actions:
        raise UsageError(f"unknown option '{key}' in {source}; valid keys: "
                         f"{_valid_keys(actions)}")
    return dest


def _read_option_file(path: str, actions: dict[str, argparse.Action]) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--config {path}: no such file")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise UsageError(f"--config {path}: not YAML: {' '.join(str(exc).split())}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"--config {path}: expected a mapping of option names to values "
                         f"(valid keys: {_valid_keys(actions)}), got {type(data).__name__}")
    return {_key(k, actions, str(path)): v for k, v in data.items()}


def _read_option_items(items: Sequence[str],
                       actions: dict[str, argparse.Action]) -> dict[str, tuple[Any, str]]:
    out: dict[str, tuple[Any, str]] = {}
    for item in items:
        key, eq, raw = item.partition("=")
        if not eq or not key.strip():
            raise UsageError(f"'{item}' is not key=value (valid keys: {_valid_keys(actions)})")
        out[_key(key.strip(), actions, "command line")] = (_yaml_value(raw), raw)
    return out


def _yaml_value(raw: str) -> Any:
    """A YAML scalar or flow list; any other text (a mapping, unparsable) stays text."""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    return raw if isinstance(value, dict) else value


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _convert(action: argparse.Action, key: str, value: Any, raw: Optional[str],
             source: str) -> Any:
    """``value`` (from YAML) as the flag would have stored it."""
    where = f"option '{key}' (from {source})"
    if value is None:
        return action.default
    if action.nargs == 0:  # store_true / store_false / store_const / BooleanOptional
        if not isinstance(value, bool):
            raise UsageError(f"{where}: expected true or false, got {value!r}")
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction,
                               argparse.BooleanOptionalAction)):
            return value
        return action.const if value else action.default
    if isinstance(action, argparse._CountAction):
        return _scalar(int, None, value, None, where)
    if isinstance(action, argparse._AppendAction) or action.nargs in ("+", "*") or (
            isinstance(action.nargs, int) and action.nargs > 1):
        if isinstance(value, dict):  # {threshold: 0.6} for a repeatable KEY=VALUE flag
            items, raw = [f"{k}={_text(v)}" for k, v in value.items()], None
        elif isinstance(value, (list, tuple)):
            items, raw = list(value), None
        else:
            items = [value]
        return [_scalar(action.type, action.choices, item, raw, where) for item in items]
    if getattr(action, "yaml_text", False):  # the flag takes YAML text: keep it as YAML
        return raw if raw is not None else (
            value if isinstance(value, str) else yaml.safe_dump(
                value, default_flow_style=True, sort_keys=False).strip())
    if isinstance(value, (list, tuple)):  # one value that takes a comma-separated list
        value = raw = ",".join(_text(v) for v in value)
    elif isinstance(value, dict):
        raise UsageError(f"{where}: expected one value, got a mapping {value!r}")
    return _scalar(action.type, action.choices, value, raw, where)


def _scalar(typ: Any, choices: Any, value: Any, raw: Optional[str], where: str) -> Any:
    if isinstance(value, (list, tuple, dict)):
        raise UsageError(f"{where}: expected one value per item, got {value!r}")
    if typ in (int, float):
        ok = not isinstance(value, bool) and (
            isinstance(value, (int, float)) if typ is float else
            isinstance(value, int) or (isinstance(value, float) and value.is_integer()))
        if isinstance(value, str):
            try:
                value, ok = typ(value), True
            except ValueError:
                ok = False
        if not ok:
            raise UsageError(f"{where}: expected {typ.__name__}, got {value!r}")
        value = typ(value)
    else:
        text = raw if raw is not None else (value if isinstance(value, str) else _text(value))
        if typ is None or typ is str:
            value = text
        else:
            try:
                value = typ(text)
            except (ValueError, TypeError, argparse.ArgumentTypeError) as exc:
                raise UsageError(f"{where}: {text!r}: {exc}") from exc
    if choices is not None and value not in choices:
        raise UsageError(f"{where}: {value!r} is not one of {', '.join(map(str, choices))}")
    return value


def _check_required(parser: argparse.ArgumentParser, args: argparse.Namespace,
                    required: tuple[list, list]) -> None:
    def given(a: argparse.Action) -> bool:
        value = getattr(args, a.dest, None)
        return value is not None and value != [] and value != a.default

    actions, groups = required
    for a in actions:
        value = getattr(args, a.dest, None)
        if value is None or value == []:
            raise UsageError(f"{a.option_strings[-1]} is required: give it as the flag, as "
                             f"{a.dest}=VALUE, or as '{a.dest}:' in the --config file")
    for g in parser._mutually_exclusive_groups:
        names = " / ".join(a.option_strings[-1] for a in g._group_actions)
        chosen = [a for a in g._group_actions if given(a)]
        if len(chosen) > 1:
            raise UsageError(f"give only one of {names} (flags, --config and key=value "
                             f"together set {', '.join(a.dest for a in chosen)})")
        if not chosen and g in groups:
            raise UsageError(f"one of {names} is required: as a flag, as key=value (e.g. "
                             f"{g._group_actions[0].dest}=VALUE) or in the --config file")


# -- running -------------------------------------------------------------------------------------

def progress_wanted(args: argparse.Namespace) -> bool:
    """Progress bars are drawn iff --no-progress was not given and stderr is a terminal."""
    if getattr(args, "no_progress", False):
        return False
    isatty = getattr(sys.stderr, "isatty", None)
    try:
        return bool(isatty and isatty())
    except (ValueError, OSError):  # a closed or detached stream
        return False


def append_json(path: str | os.PathLike, data: Any) -> None:
    """``--json FILE``: append ``data`` to FILE as one line of strict JSON (a missing figure,
    NaN or infinity, is null), creating FILE and its folder when missing."""
    path = Path(path)
    line = json.dumps(json_safe(data), allow_nan=False, default=str)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")


def error_line(exc: BaseException) -> str:
    """The exception's message on one line."""
    text = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return text or type(exc).__name__


def tool_main(fn: Callable[..., Optional[int]]) -> Callable[..., int]:
    """Decorate a tool's ``main(argv=None)``: a usage or configuration error (``USAGE_ERRORS``)
    returns 2 after one ``error: ...`` line on stderr (once, from rank 0 under torchrun); a
    ``None`` return is 0."""

    @functools.wraps(fn)
    def main(argv: Optional[Sequence[str]] = None) -> int:
        try:
            rc = fn(argv)
        except USAGE_ERRORS as exc:
            if os.environ.get("RANK", "0") == "0":  # every rank finds the same error
                print(f"error: {error_line(exc)}", file=sys.stderr)
            return 2
        return 0 if rc is None else rc

    return main
