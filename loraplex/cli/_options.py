"""Annotated option aliases shared by the commands (one place for names, defaults and help).

An option that sets a config's field (`--steps` is `TrainConfig.steps`) takes its help from the field's
docstring (`field_option`), so the help and the config cannot say two different things. The docstring
is read from the config module's source (`field_doc`), not by importing it: the config modules import
torch and lightning, and `loraplex --help` must stay fast. The configs carry
`use_attribute_docstrings=True`, so pydantic reads the same docstrings as their fields' descriptions
(tests/test_cli_help.py holds the two equal).
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import inspect
import json
import re
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

FIELD_OPTIONS: list[tuple[str, str]] = []
"""(option name, "module:Class.field") of every option built by `field_option`, in order."""


@functools.lru_cache(maxsize=None)
def _class_docs(module: str) -> dict[str, tuple[list[str], dict[str, str]]]:
    """{class: (its base classes' names, {field: docstring})} of a module, read from its source with
    `ast` (the module is not imported). A field's docstring is the string statement right after its
    annotated assignment, cleaned as pydantic cleans it (`inspect.cleandoc`)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin:
        raise LookupError(f"no module {module!r}")
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    classes: dict[str, tuple[list[str], dict[str, str]]] = {}
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        docs: dict[str, str] = {}
        for stmt, nxt in zip(node.body, node.body[1:]):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
                docs[stmt.target.id] = inspect.cleandoc(nxt.value.value)
        classes[node.name] = ([b.id for b in node.bases if isinstance(b, ast.Name)], docs)
    return classes


def field_doc(ref: str) -> str:
    """The docstring of a config's field, `ref` being "module:Class.field" (e.g.
    "loraplex.training:TrainConfig.steps"); a field inherited from a class of the same module is found
    there. LookupError when the field has no docstring."""
    module, _, path = ref.partition(":")
    cls, _, field = path.partition(".")
    classes = _class_docs(module)
    seen = cls
    while cls in classes:
        bases, docs = classes[cls]
        if field in docs:
            return docs[field]
        cls = next((b for b in bases if b in classes), "")
    raise LookupError(f"{module}: {seen}.{field} has no docstring to use as help")


def field_option(ref: str, *param_decls: str, syntax: str | None = None, **kwargs: Any) -> Any:
    """`typer.Option(*param_decls, help=<the docstring of the field ref>, **kwargs)` (see `field_doc`);
    `syntax` adds how the command line spells the value (`comma-separated`), which the config does not say."""
    FIELD_OPTIONS.append((param_decls[0], ref))
    doc = field_doc(ref)
    return typer.Option(*param_decls, help=f"{doc} ({syntax})" if syntax else doc, **kwargs)


Home = Annotated[
    Optional[str],  # a str, not a Path: Path("") is Path("."), and an empty --home must be refused, not read as "."
    typer.Option("--home", help="Registry directory (default: $LORAPLEX_HOME, else ~/.loraplex).", show_default=False),
]
Json = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def _named_base(value: Optional[str]) -> Optional[str]:
    """An empty --base is refused: it read as "not given" (the default base, or every base)."""
    if value is not None and not value.strip():
        raise typer.BadParameter("is empty: name a base (minilm, smollm2, or a local model directory), or leave it out")
    return value


Base = Annotated[
    Optional[str],
    typer.Option("--base", help="Base model: minilm, smollm2, or a local model directory.", callback=_named_base),
]
Description = Annotated[
    Optional[str],
    typer.Option("--description", help="What the task is, in words (used for search and routing); default: the "
                 "task's own description."),
]

_LIGHTNING = "loraplex.training:LightningSettings"
Devices = Annotated[str, field_option(f"{_LIGHTNING}.devices", "--devices")]
Strategy = Annotated[str, field_option(f"{_LIGHTNING}.strategy", "--strategy")]
Precision = Annotated[str, field_option(f"{_LIGHTNING}.precision", "--precision")]
Quiet = Annotated[bool, typer.Option("--quiet", help="No progress bar.")]


def settings(home: Optional[str]):
    """Settings for a command: --home wins over $LORAPLEX_HOME."""
    from loraplex.settings import Settings

    return Settings.load(home=home)


def parse_list(value: str | None, option: str = "a list option", *, commas_only: bool = False) -> list[str]:
    """`a,b, c` -> ["a", "b", "c"] (for comma-separated options); None (not given) -> []. Given but naming
    nothing (`--adapters ""`) is refused: it would otherwise read as "not given" (often: all of them); so are
    an empty entry (`a,,b`) and a name given twice. Names (adapters, modules) may also be separated by
    spaces; `commas_only` for values that may hold spaces (labels: "not good"; task file paths), where an
    entry that holds a comma is written in double quotes, as in a CSV row: `"yes, mostly",no`."""
    if value is None:
        return []
    from loraplex.errors import UserInputError

    if commas_only:
        parts = split_quoted(value, option)
    else:
        parts = value.split(",")
    out = [v for v in (x.strip() for p in parts for x in ([p] if commas_only else re.split(r"\s+", p))) if v]
    if not out:
        raise UserInputError(f"{option} is empty: name at least one, or leave the option out")
    if any(not part.strip() for part in parts):  # `a,,b` or `a,`: a name left out, or a typo
        raise UserInputError(f"{option} {value!r} has an empty entry between commas")
    twice = next((v for i, v in enumerate(out) if v in out[:i]), None)
    if twice is not None:  # `--tasks a,a` counted a task twice in the totals
        raise UserInputError(f"{option} names {twice!r} twice")
    return out


def split_quoted(value: str, option: str) -> list[str]:
    """A comma-separated value read as one CSV row (double quotes hold a comma; `""` is a quote in them)."""
    import csv

    from loraplex.errors import UserInputError

    try:
        rows = list(csv.reader([value], skipinitialspace=True, strict=True))
    except csv.Error as exc:
        raise UserInputError(f"{option} {value!r}: {exc} (an entry that holds a comma goes in double quotes: "
                             f'"a, b",c)') from None
    return rows[0] if rows else []


class SetOptions(dict):
    """A config dict read from `--set` pairs: the checks that type its values (`api._typed`) name the
    option as `--set KEY`, the way the user wrote it, not as the API function's argument."""


def parse_sets(items: list[str] | None) -> dict[str, Any]:
    """`--set KEY=VALUE` pairs -> a config dict, for every command that takes them: keys with `-` read as
    `_`, `a.b=1` nests, values read as JSON when they parse (2, 0.5, true, [64, 64]), else as text (the
    config's pydantic model then checks types and ranges). A number JSON does not read but Python would
    (`1_0`) is refused: pydantic would read it as 10, a typo read as a value."""
    from loraplex.errors import InvalidSpec

    cfg: dict[str, Any] = SetOptions()
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise InvalidSpec(f"--set takes KEY=VALUE, got {item!r}")
        raw = raw.strip()
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
            if "_" in raw and _python_number(raw):
                raise InvalidSpec(f"--set {item!r}: {raw!r} is not a number as JSON writes it "
                                  f"(write it without underscores)")
        node = cfg
        parts = [p.strip().replace("-", "_") for p in key.strip().split(".")]
        if not all(parts):
            raise InvalidSpec(f"--set {item!r}: an empty name in {key.strip()!r}")
        for p in parts[:-1]:
            node = node.setdefault(p, SetOptions())
            if not isinstance(node, dict):
                raise InvalidSpec(f"--set {item!r}: {p!r} is not a group of settings")
        if parts[-1] in node:
            raise InvalidSpec(f"--set {'.'.join(parts)} is given twice; give each key once")
        node[parts[-1]] = value
    return cfg


def _python_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
