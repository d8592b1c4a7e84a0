"""The config reference (``docs/config-reference.md``), generated from the field docstrings of
:mod:`hvd_trainer.config`, so the page cannot drift from the code.

    python -m hvd_trainer.config_reference > docs/config-reference.md   # regenerate
    python -m hvd_trainer.config_reference --check                      # exit 1 when it is stale

The sections set ``use_attribute_docstrings``, so pydantic keeps the string under each field as
its ``description``; a field without one is read from the class source with :mod:`ast`, and a
field with neither is listed by :func:`undocumented` (``tests/unit/test_docs.py`` fails on it).
"""
from __future__ import annotations

import argparse
import ast
import inspect
import re
import sys
import textwrap
import typing
from pathlib import Path
from typing import Any, Iterator, Optional

from pydantic import BaseModel

from .config import TrainConfig

REGENERATE = "python -m hvd_trainer.config_reference > docs/config-reference.md"
DEFAULT_PATH = Path(__file__).resolve().parents[1] / "docs" / "config-reference.md"

HEADER = f"""# Config reference

<!-- Generated from the field docstrings of hvd_trainer/config/; do not edit.
     Regenerate: {REGENERATE} -->

Every key below can be set in the YAML file (nested under its section) or on the command line
as a dotted `KEY=VALUE` override, for example `optim.lr=0.1`. Values are read as YAML scalars.
An unknown key, a wrong type or a value out of range stops every rank with one line naming the
key (exit 2). How the config is loaded: [config.md](config.md).
"""


def _is_section(annotation: Any) -> bool:
    return inspect.isclass(annotation) and issubclass(annotation, BaseModel)


def _source_docstrings(cls: type) -> dict[str, str]:
    """Field name -> the string literal right under its annotated assignment in ``cls``'s source."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    found = {}
    for stmt, nxt in zip(body, body[1:]):
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) \
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) \
                and isinstance(nxt.value.value, str):
            found[stmt.target.id] = inspect.cleandoc(nxt.value.value)
    return found


def fields(model: type[BaseModel] = TrainConfig, prefix: str = "") -> Iterator[tuple[str, Any, Optional[str]]]:
    """``(dotted key, FieldInfo, docstring or None)`` for every setting, sections flattened, in
    declaration order: top-level settings first, then each section's."""
    from_source = _source_docstrings(model)
    sections = []
    for name, info in model.model_fields.items():
        if _is_section(info.annotation):
            sections.append((name, info.annotation))
        else:
            yield prefix + name, info, info.description or from_source.get(name)
    for name, section in sections:
        yield from fields(section, f"{prefix}{name}.")


def undocumented() -> list[str]:
    """Keys whose field has no docstring."""
    return [key for key, _, doc in fields() if not (doc and doc.strip())]


def _type(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return "one of " + ", ".join(f"`{a}`" for a in args)
    if origin is typing.Union or type(annotation).__name__ == "UnionType":
        rest = [a for a in args if a is not type(None)]
        text = " or ".join(_type(a) for a in rest)
        return f"{text} or `null`" if len(rest) < len(args) else text
    if origin in (list, tuple, set):
        item = _type(args[0]) if args else "any"
        return f"list, each {item}" if item.startswith("one of") else f"list of {item}"
    return getattr(annotation, "__name__", str(annotation))


def _number(value: Any) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return str(value)


def _bounds(info: Any) -> str:
    marks = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    out = [f"{sign} {_number(getattr(m, attr))}" for m in info.metadata
           for attr, sign in marks.items() if getattr(m, attr, None) is not None]
    return ", " + ", ".join(out) if out else ""


def _yaml(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    if isinstance(value, str):
        return value if value else '""'
    return repr(value)


def _default(info: Any) -> str:
    value = info.get_default(call_default_factory=True)
    return f"`{_yaml(value)}`"


def _cell(text: Optional[str]) -> str:
    text = re.sub(r"\s+", " ", text or "(undocumented)").strip()
    text = re.sub(r"``([^`]+)``", r"`\1`", text)  # reST literals -> markdown
    return text.replace("|", "\\|")


def render() -> str:
    """The whole page, as markdown: per section a table of key, type, default and meaning."""
    groups: dict[str, list[str]] = {}
    for key, info, doc in fields():
        section = key.split(".")[0] if "." in key else ""
        row = f"| `{key}` | {_cell(_type(info.annotation) + _bounds(info))} | {_default(info)} | {_cell(doc)} |"
        groups.setdefault(section, []).append(row)
    parts = [HEADER]
    for section, rows in groups.items():
        title = f"`{section}`" if section else "Top level"
        parts.append(f"\n## {title}\n\n| key | type | default | meaning |\n|---|---|---|---|\n" + "\n".join(rows) + "\n")
    return "".join(parts)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hvd_trainer.config_reference",
                                description="Print the config reference (markdown) on stdout.")
    p.add_argument("--check", nargs="?", const=str(DEFAULT_PATH), metavar="FILE",
                   help=f"exit 1 when FILE (default {DEFAULT_PATH}) differs from what would be generated")
    args = p.parse_args(argv)
    text = render()
    if args.check is None:
        sys.stdout.write(text)
        return 0
    path = Path(args.check)
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return 0
    print(f"{path} is out of date with hvd_trainer/config/; regenerate it: {REGENERATE}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
