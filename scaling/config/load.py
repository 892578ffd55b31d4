"""Reading a recipe: defaults <- YAML layers <- `--set` overrides <- exact values, then
`validate`; and writing the resolved recipe back (`to_yaml`, `save_config`)."""
from __future__ import annotations

import difflib
import os
from dataclasses import fields, is_dataclass, replace
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vidscale.scaling.config.errors import RecipeError
from vidscale.scaling.config.recipe import Config
from vidscale.scaling.config.validate import validate


def _keys(dc, prefix="") -> list[str]:
    out = []
    for f in fields(dc):
        sub = getattr(dc, f.name)
        out.append(prefix + f.name)
        if is_dataclass(sub):
            out += _keys(sub, prefix + f.name + ".")
    return out


_ALL_KEYS = _keys(Config())


def _one_line(err: OmegaConfBaseException, where: str) -> RecipeError:
    key = getattr(err, "full_key", None) or ""
    msg = str(err).splitlines()[0]
    if "Key" in type(err).__name__ or "not in struct" in msg or "ConfigAttributeError" in type(err).__name__:
        close = difflib.get_close_matches(key, _ALL_KEYS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return RecipeError(f"{where}: unknown key '{key}'{hint}")
    if "Validation" in type(err).__name__:
        return RecipeError(f"{where}: key '{key}': {msg}")
    return RecipeError(f"{where}: key '{key}': {msg}")


def _merge(base, other, where: str):
    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as e:
        raise _one_line(e, where) from None


def load_config(recipe: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                values: dict[str, Any] | None = None) -> Config:
    """Defaults <- recipe YAML (optionally with `base: other.yaml`) <- `key=value` overrides
    <- `values`: {key: value} set as they are, never parsed (paths, addresses, job ids that
    the CLI takes as arguments: a run dir named `a #2`, `true` or `${x}` stays exactly that)."""
    cfg = OmegaConf.structured(Config)
    if recipe is not None:
        for layer, path in _recipe_layers(Path(recipe)):
            cfg = _merge(cfg, layer, str(path))
    dotlist = []
    for o in overrides:
        if "=" not in o:
            raise RecipeError(f"--set {o!r}: expected key=value, e.g. train.steps=20")
        dotlist.append(o)
    for o in dotlist:
        key, value = o.split("=", 1)
        if value == "" and isinstance(OmegaConf.select(cfg, key.strip(), default=None), str):
            o = f"{key}=''"  # `--set cluster.address=` empties a string key (YAML would read null)
        try:
            layer = OmegaConf.from_dotlist([o])
        except OmegaConfBaseException as e:
            raise RecipeError(f"--set {o!r}: {str(e).splitlines()[0]}") from None
        except yaml.YAMLError as e:  # the value is parsed as YAML: `[1` is an unclosed list
            raise RecipeError(f"--set {o!r}: value is not valid YAML ({str(e).splitlines()[0]}); "
                              f"quote it or close its brackets") from None
        cfg = _merge(cfg, layer, f"--set {o}")
    return _finish(cfg, str(recipe) if recipe else "<defaults>", values)


def _finish(cfg, where: str, values: dict[str, Any] | None = None) -> Config:
    """The merged OmegaConf tree as a validated `Config` (after `values`, set exactly)."""
    obj: Config = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    if values:
        obj = set_values(obj, values)
    validate(obj, where)
    return obj


def _is_mapping(raw) -> bool:
    return isinstance(raw, DictConfig)


def set_values(cfg: Config, values: dict[str, Any]) -> Config:
    """A copy of `cfg` with `{"section.key": value}` set exactly (type-checked, not parsed)."""
    for key, value in values.items():
        parts = key.split(".")
        chain = [cfg]
        for name in parts[:-1]:
            sub = getattr(chain[-1], name, None)
            if not is_dataclass(sub):
                raise RecipeError(f"unknown key '{key}'")
            chain.append(sub)
        leaf = chain[-1]
        kinds = {f.name: f.type for f in fields(leaf)}
        if parts[-1] not in kinds:
            raise RecipeError(f"unknown key '{key}'")
        current = getattr(leaf, parts[-1])
        if type(value) is not type(current) and not (isinstance(current, float) and type(value) is int):
            kind = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
            raise RecipeError(f"key '{key}' = {value!r}: expected {kind.get(type(current), type(current).__name__)}")
        if isinstance(value, str) and ("\n" in value or "\x00" in value):
            raise RecipeError(f"key '{key}' = {value!r}: a newline or NUL byte cannot be kept exactly; "
                              "choose another value")
        new = value
        for obj, name in zip(reversed(chain), reversed(parts)):
            new = replace(obj, **{name: new})
        cfg = new
    return cfg


def load_config_text(text: str, where: str) -> Config:
    """A complete recipe held as text (the resolved config in a weights file's metadata); errors
    name `where` (that file). It may not name a `base:` file: nothing outside it is read."""
    try:
        raw = OmegaConf.create(text)
    except Exception as e:  # noqa: BLE001 - yaml scanner errors are multi-line
        raise RecipeError(f"{where}: the stored recipe is not valid YAML: {str(e).splitlines()[0]}") from None
    if not _is_mapping(raw):
        raise RecipeError(f"{where}: the stored recipe is not a mapping of recipe keys")
    if "base" in raw:
        raise RecipeError(f"{where}: the stored recipe names a base file ('base: ...'); a stored recipe is "
                          "complete and may not")
    return _finish(_merge(OmegaConf.structured(Config), raw, where), where)


def _recipe_layers(path: Path) -> list[tuple[Any, Path]]:
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        raw = OmegaConf.load(path)
    except Exception as e:  # yaml scanner errors are multi-line
        raise RecipeError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not _is_mapping(raw):
        raise RecipeError(f"{path}: expected a mapping of recipe keys at the top level")
    layers = []
    base = raw.pop("base", None) if "base" in raw else None
    if base:
        layers += _recipe_layers((path.parent / str(base)).resolve())
    layers.append((raw, path))
    return layers


def _escape(node):
    """Strings as they are: OmegaConf would resolve `${...}` when the file is read back."""
    if isinstance(node, str):
        return node.replace("${", "\\${")
    if isinstance(node, dict):
        return {k: _escape(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_escape(v) for v in node]
    return node


def to_yaml(cfg: Config) -> str:
    plain = OmegaConf.to_container(OmegaConf.structured(cfg))
    return OmegaConf.to_yaml(OmegaConf.create(_escape(plain)))


def save_config(cfg: Config, path: str | Path) -> None:
    """Written to a temporary file and renamed: a reader never sees half a recipe."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(to_yaml(cfg))
    tmp.replace(path)
