"""Configuration: frozen dataclasses, loaded from YAML, overridden with `--set a.b=value`.

Every section is a frozen dataclass with a comment on each default. `load_config` builds the
tree from a YAML mapping, applies dotted overrides and rejects unknown keys by their dotted
name, so a typo in a 50-line YAML file is reported as `run.filter.treshold`, not ignored.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration key or value that cannot be used; the message names the key."""


# ---------------------------------------------------------------------------------------------
# Sections


@dataclass(frozen=True)
class ColumnsConfig:
    key: str = "key"  # unique row id (img2dataset writes a zero-padded shard+index string)
    image: str = "jpg"  # encoded image bytes (img2dataset's parquet output stores them in `jpg`)
    text: str = "caption"  # the web (alt-text) caption
    status: str = "status"  # img2dataset download status; rows not equal to "success" are failed


@dataclass(frozen=True)
class ImageConfig:
    max_pixels: int = 40_000_000  # decoded width*height above this is refused (decompression bombs)
    max_bytes: int = 20_000_000  # encoded size above this is refused before decoding
    min_side: int = 8  # images smaller than this on either side are refused as unusable


@dataclass(frozen=True)
class CaptionConfig:
    num_captions: int = 1  # synthetic captions per image (the BLIP paper uses one)
    prompt: str = "a picture of "  # decoder prompt; stripped from the returned captions
    top_p: float = 0.9  # nucleus sampling mass, as in BLIP's CapFilt
    repetition_penalty: float = 1.1  # BLIP's sampling setting
    min_length: int = 5  # in tokens, prompt excluded
    max_length: int = 20  # in tokens, prompt excluded
    beam: bool = False  # beam search instead of nucleus sampling
    num_beams: int = 3  # beam width when beam is true
    batch_size: int = 64  # images per captioner call
    seed: int = 0  # sampling seed, combined with the row key so results do not depend on batching


@dataclass(frozen=True)
class FilterConfig:
    threshold: float = 0.5  # keep a text when its ITM P(match) is at least this
    keep: Literal["both", "web", "synthetic"] = "both"  # which texts may be kept
    batch_size: int = 64  # images per filter call (each with all of its texts)


@dataclass(frozen=True)
class ResourcesConfig:
    address: str = ""  # Ray address: "" starts a local in-process Ray; "auto" or "ray://host:10001"
    captioner_actors: int = 1  # captioner actor pool size
    filter_actors: int = 1  # filter actor pool size
    gpus_per_actor: float = 0.0  # 0 runs on CPU; set to 1 (or a fraction) on a GPU cluster
    cpus_per_actor: float = 1.0  # CPU slots each model actor reserves
    decode_cpus: float = 1.0  # CPU slots per image-decode task
    object_store_memory: int = 0  # bytes for a local Ray's object store; 0 lets Ray choose
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU


@dataclass(frozen=True)
class RunConfig:
    round: int = 0  # bootstrap round recorded in the output provenance
    columns: ColumnsConfig = field(default_factory=ColumnsConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)


@dataclass(frozen=True)
class DemoConfig:
    seed: int = 0  # the whole world is a function of this seed
    num_human: int = 600  # clean "human-annotated" pairs
    num_web: int = 600  # web pairs, a share of them noisy
    num_test: int = 200  # clean held-out pairs
    noise: float = 0.5  # share of web rows whose caption is noisy
    image_size: int = 64  # side of the square images, in pixels
    rows_per_shard: int = 200  # rows per parquet shard


@dataclass(frozen=True)
class DownloadConfig:
    image_size: int = 256  # img2dataset resizes to this side
    resize_mode: Literal["no", "keep_ratio", "center_crop", "border"] = "keep_ratio"
    processes: int = 1  # img2dataset processes
    threads: int = 16  # img2dataset threads per process
    timeout: int = 10  # seconds per URL
    retries: int = 0  # img2dataset retries per URL
    rows_per_shard: int = 10_000  # img2dataset number_sample_per_shard


@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    download: DownloadConfig = field(default_factory=DownloadConfig)


# ---------------------------------------------------------------------------------------------
# Loading


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting the few safe cases (int -> float)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return _build(tp, value, key + ".")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {list(choices)}")
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if arg is type(None) and value is None:
                return None
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} fits none of {tp}")
    if origin in (list, tuple):
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int and isinstance(value, bool):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
    return value


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s} (known under {prefix or 'top level'}: "
            f"{', '.join(sorted(names))})"
        )
    kwargs = {name: _coerce(value, hints[name], prefix + name) for name, value in data.items()}
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", value), the value read as YAML so `3`, `0.5`, `true` get types."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    return key, yaml.safe_load(raw) if raw.strip() else ""


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                cls: type = Config) -> Any:
    """Build `cls` from an optional YAML file and `key=value` overrides (later ones win)."""
    tree: dict = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text())
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        tree = loaded or {}
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    return _build(cls, tree)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def write_resolved(cfg: Any, directory: str | Path, name: str = "config.yaml") -> Path:
    """Write the resolved config next to an output, so every output says how it was made."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(json.loads(json.dumps(to_dict(cfg))), sort_keys=False))
    tmp.replace(path)
    return path
