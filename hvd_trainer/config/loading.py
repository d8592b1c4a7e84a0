"""Loading a config: YAML (a file or a built-in name) plus ``KEY=VALUE`` overrides, validated
into a :class:`TrainConfig` whose errors name the key; and comparing the configs of ranks."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import ValidationError

from .sections import ConfigError, TrainConfig, _FieldError

BUILTIN = Path(__file__).resolve().parents[1] / "configs"


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: '{part}' is not a section")
        node = child
    node[parts[-1]] = value


class _Loader(yaml.SafeLoader):
    """YAML as a Python or PyTorch user writes it: ``3e-4`` and ``1E6`` are numbers (YAML 1.1
    wants a dot, and reads them as strings), and a key given twice is an error, not last-wins."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"{key}: given twice (line {key_node.start_mark.line + 1}); "
                                  f"a second block would silently replace the first")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(  # after 1.1's int and float: only what those refuse
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{item}: overrides are KEY=VALUE")
        try:
            value = _yaml(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(tree, key.strip(), value)
    return tree


def merge_trees(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` laid over it, section by section."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_trees(out[key], value)
        else:
            out[key] = value
    return out


def format_validation_error(err: ValidationError) -> str:
    """pydantic's first error as the one line a user sees (``key.sub: what is wrong``)."""
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"] if not isinstance(p, int))
    ctx_err = (first.get("ctx") or {}).get("error")
    if isinstance(ctx_err, _FieldError):
        return f"{loc + '.' if loc else ''}{ctx_err.key}: {ctx_err.msg}"
    if first["type"] == "extra_forbidden":
        return f"{loc}: unknown key"
    got = first.get("input")
    got_s = f", got {got!r}" if not isinstance(got, dict) else ""
    return f"{loc}: {first['msg'].lower()}{got_s}"


def from_dict(tree: dict[str, Any]) -> TrainConfig:
    try:
        return TrainConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from None


def read_tree(path: str | os.PathLike) -> dict[str, Any]:
    """The mapping in a YAML file, or in a built-in config by name (``"digits"``)."""
    p = Path(path)
    builtin = BUILTIN / f"{p.name}.yaml"
    if not p.is_file() and str(path) == p.name and builtin.is_file():
        p = builtin  # a name, as ``hvd-train digits`` takes it; a file of that name wins
    if not p.is_file():
        names = ", ".join(sorted(q.stem for q in builtin.parent.glob("*.yaml")))
        raise ConfigError(f"config: no file {str(path)!r} and no built-in config of that name "
                          f"(built-in: {names})")
    try:
        loaded = _yaml(p.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"config: {p} is not UTF-8 text (byte {err.start})") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config: {p} is not valid YAML ({str(err).splitlines()[0]})") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"config: {p} must hold a mapping at the top level")
    return loaded or {}


def load_config(path: Optional[str | os.PathLike] = None, overrides: Optional[list[str]] = None) -> TrainConfig:
    """Load a YAML file, or a built-in config by name (``"digits"``: ``hvd_trainer/configs/``), or
    only defaults when ``path`` is None; then apply ``KEY=VALUE`` overrides."""
    tree = read_tree(path) if path is not None else {}
    return from_dict(merge_trees(tree, parse_overrides(overrides or [])))


def with_settings(tree: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """``tree`` with dotted keys set to values already typed (not YAML text)."""
    extra: dict[str, Any] = {}
    for key, value in settings.items():
        _set_dotted(extra, key, value)
    return merge_trees(tree, extra)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def first_difference(mine: dict[str, Any], reference: dict[str, Any]) -> Optional[tuple[str, Any, Any]]:
    """The first dotted key whose value differs: (key, mine, reference's), or None."""
    a, b = _flatten(mine), _flatten(reference)
    for key in list(b) + [k for k in a if k not in b]:
        if a.get(key, "<missing>") != b.get(key, "<missing>"):
            return key, a.get(key, "<missing>"), b.get(key, "<missing>")
    return None


def check_agreement(views: list[dict[str, Any]], what: str) -> None:
    """Raise the same one-line :class:`ConfigError` on every rank when any rank's ``what``
    (``views[r]``, gathered from every rank) differs from rank 0's."""
    for rank, view in enumerate(views[1:], start=1):
        diff = first_difference(view, views[0])
        if diff:
            key, mine, ref = diff
            raise ConfigError(f"rank {rank}'s {what} differs from rank 0's: {key} {mine} vs {ref}")


def replace(cfg: TrainConfig, **dotted: Any) -> TrainConfig:
    """A copy of ``cfg`` with dotted keys replaced (``replace(cfg, **{"optim.lr": 0.1})``), validated."""
    tree = cfg.to_dict()
    for key, value in dotted.items():
        _set_dotted(tree, key, value)
    return from_dict(tree)
