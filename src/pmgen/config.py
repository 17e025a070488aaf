"""Dataclass configs as typer options: the one way pmgen turns settings into command-line options.

Every field of a config dataclass becomes ``--field-name`` with the field's type, its default (shown
by typer) and its line of the class docstring as help (``name: what it is``, continuation lines
indented deeper; ``a, b: ...`` documents several fields). Tuples are written as comma-separated
values (``--unet-channels 64,128,192``), booleans as ``--flag/--no-flag``, and ``none`` sets an
optional number to ``None``. Unknown options are rejected by typer.

    @app.command("generator")
    @config_options(GeneratorTrainConfig, always=("out", "minutes"))
    def train_generator(given: dict, resume: bool = False) -> None:
        ...

The command receives ``given``: the fields set on the command line (plus ``always``, at their
defaults when not set), so a caller can tell "left at the default" from "set to the default".
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import types
import typing
from collections.abc import Callable, Iterable
from typing import Any

_ENTRY = re.compile(r"^(\s*)([A-Za-z_]\w*(?:\s*,\s*[A-Za-z_]\w*)*):\s+(\S.*)$")


def field_docs(cls: type) -> dict[str, str]:
    """``{field: help}`` from the ``name: text`` entries of the docstrings of ``cls`` and its bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        lines = (klass.__doc__ or "").splitlines() if klass.__dict__.get("__doc__") else []
        k = 0
        while k < len(lines):
            m = _ENTRY.match(lines[k])
            k += 1
            if not m:
                continue
            indent, names, text = len(m.group(1)), m.group(2), [m.group(3)]
            while k < len(lines) and lines[k].strip() and len(lines[k]) - len(lines[k].lstrip()) > indent:
                text.append(lines[k].strip())
                k += 1
            for name in re.split(r"\s*,\s*", names):
                docs[name] = re.sub(r":\w+:`~?([^`]*)`", r"\1", " ".join(text)).replace("``", "")
    return docs


def _parts(hint: Any) -> tuple[Any, bool]:
    """``(type without None, optional)`` of a field's type hint."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"unsupported config field type {hint!r}")
        return args[0], True
    return hint, False


def _tuple_parser(name: str, kind: type, optional: bool) -> Callable[[str], Any]:
    def parse(text: Any) -> Any:
        if not isinstance(text, str):  # the default, already a tuple
            return text
        if optional and text.strip().lower() == "none":
            return None
        try:
            return tuple(kind(x.strip()) for x in text.split(",") if x.strip())
        except ValueError:
            raise ValueError(f"--{name.replace('_', '-')}: expected comma-separated {kind.__name__} values, "
                             f"got {text!r}") from None
    parse.__name__ = f"{kind.__name__}s"
    return parse


def _optional_parser(kind: type) -> Callable[[str], Any]:
    def parse(text: Any) -> Any:
        if not isinstance(text, str) or text.strip().lower() == "none":
            return None if isinstance(text, str) else text
        return kind(text)
    parse.__name__ = kind.__name__
    return parse


def dataclass_parameters(cls: type, exclude: Iterable[str] = ()) -> list[inspect.Parameter]:
    """One keyword parameter (``typer.Option`` default) per field of the dataclass ``cls``."""
    import typer

    try:
        from rich.markup import escape
    except ImportError:  # pragma: no cover
        escape = str
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    params = []
    for f in dataclasses.fields(cls):
        if f.name in exclude or not f.init:
            continue
        kind, optional = _parts(hints[f.name])
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = ... if required else (f.default if f.default is not dataclasses.MISSING else f.default_factory())
        help_text = escape(docs.get(f.name, ""))
        opt = f"--{f.name.replace('_', '-')}"
        if typing.get_origin(kind) is tuple:
            elem = typing.get_args(kind)[0]
            shown = "none" if default is None else ",".join(map(str, default)) if default is not ... else ...
            info = typer.Option(shown, opt, help=help_text, parser=_tuple_parser(f.name, elem, optional),
                                metavar=f"{elem.__name__.upper()},...")
            annotation: Any = str
        elif kind is bool:
            info = typer.Option(default, f"{opt}/--no-{f.name.replace('_', '-')}", help=help_text)
            annotation = bool
        elif optional and kind in (int, float):
            info = typer.Option(default, opt, help=help_text, parser=_optional_parser(kind),
                                metavar=kind.__name__.upper())
            annotation = str
        else:
            info = typer.Option(default, opt, help=help_text)
            annotation = typing.Optional[kind] if optional else kind  # noqa: UP045 - typer reads Optional
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=annotation))
    return params


def config_options(cls: type, always: Iterable[str] = ()) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: the command's options are ``cls``'s fields plus the command's own keyword parameters.

    The decorated function's first parameter receives ``given`` (a dict: the fields set on the command
    line, and the fields in ``always`` at their values either way); its other parameters stay typer
    parameters of their own. Values are checked by typer (types) and by the config class (ranges).
    """
    import typer

    always = tuple(always)

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        hints = typing.get_type_hints(fn, include_extras=True)
        own = [p.replace(annotation=hints.get(p.name, p.annotation), kind=inspect.Parameter.KEYWORD_ONLY)
               for p in list(inspect.signature(fn).parameters.values())[1:]]
        fields = dataclass_parameters(cls, exclude={p.name for p in own})
        names = [p.name for p in fields]
        ctx_param = inspect.Parameter("_ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)

        def command(_ctx: typer.Context, **kwargs: Any) -> Any:
            given = {}
            for name in names:
                source = _ctx.get_parameter_source(name)
                # (compared by name: typer may bring its own copy of click's ParameterSource)
                if name in always or (source is not None and source.name != "DEFAULT"):
                    given[name] = kwargs[name]
            return fn(given, **{p.name: kwargs[p.name] for p in own})

        params = [ctx_param, *own, *fields]
        command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        command.__doc__ = fn.__doc__
        command.__name__ = fn.__name__
        command.__module__ = fn.__module__
        return command

    return decorate
