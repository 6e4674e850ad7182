"""Paddle Serving model configs (``serving_{server,client}_conf.prototxt``): read, write, look up vars.

The config lists the model's feed and fetch variables: real name, alias, element type and per-sample
shape (the batch dimension is left out; ``-1`` marks a variable-length LoD input).

Example::

    cfg = ServingConfig.load("serving_client/serving_client_conf.prototxt")
    cfg.feed("img").shape        # (1, 28, 28)
    cfg.fetch_names               # ['prediction']
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Sequence, Union

from google.protobuf import text_format

from .atomic_file import atomic_write
from .proto import general_model_config_pb2 as config_pb2
from .tensor_codec import ELEM_TYPES, dtype_of_elem_type

CLIENT_CONF = "serving_client_conf.prototxt"
SERVER_CONF = "serving_server_conf.prototxt"
MAX_CONFIG_BYTES = 16 << 20   # a config lists a model's feeds and fetches: kilobytes


def stream_name(conf_name: str) -> str:
    """``serving_client_conf.prototxt`` -> ``serving_client_conf.stream.prototxt`` (the binary twin)."""
    stem, ext = os.path.splitext(conf_name)
    return f"{stem}.stream{ext}"


@dataclass(frozen=True)
class VarSpec:
    """One feed or fetch variable of a serving model."""

    name: str
    alias_name: str
    elem_type: int
    shape: tuple[int, ...]
    is_lod_tensor: bool = False

    @property
    def dtype(self):
        """The numpy dtype of ``elem_type``."""
        return dtype_of_elem_type(self.elem_type, what=f"variable {self.alias_name!r}")


class ConfigError(ValueError):
    """A serving config that cannot be read or does not name what was asked."""


@dataclass(frozen=True)
class ServingConfig:
    """Feed and fetch variables of one serving model, in config order."""

    feeds: tuple[VarSpec, ...]
    fetches: tuple[VarSpec, ...]
    source: str = ""

    @property
    def feed_names(self) -> list[str]:
        return [v.alias_name for v in self.feeds]

    @property
    def fetch_names(self) -> list[str]:
        return [v.alias_name for v in self.fetches]

    def feed(self, alias: str) -> VarSpec:
        """The feed var with this alias (or real name); ConfigError lists the known feeds."""
        return _lookup(self.feeds, alias, "feed", self.source)

    def fetch(self, alias: str) -> VarSpec:
        """The fetch var with this alias (or real name); ConfigError lists the known fetches."""
        return _lookup(self.fetches, alias, "fetch", self.source)

    # -- reading -------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> ServingConfig:
        """Read a config file (text format), or the config inside a serving client/server folder.

        Raises:
            ConfigError: naming the file: missing, unreadable, not UTF-8, over ``MAX_CONFIG_BYTES``, not a
                GeneralModelConfig in text format, or a variable whose elem_type has no numpy dtype here.
        """
        path = os.fspath(path)
        if os.path.isdir(path):
            for name in (CLIENT_CONF, SERVER_CONF):
                if os.path.exists(os.path.join(path, name)):
                    path = os.path.join(path, name)
                    break
            else:
                raise ConfigError(f"no {CLIENT_CONF} or {SERVER_CONF} in folder {path!r}")
        if not os.path.exists(path):
            raise ConfigError(f"serving config {path!r} does not exist")
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size   # read what is there, never reserve the maximum
                data = f.read(min(size, MAX_CONFIG_BYTES) + 1)
            if len(data) > MAX_CONFIG_BYTES:
                raise ConfigError(f"serving config {path!r} is over {MAX_CONFIG_BYTES} bytes")
            text = data.decode("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"serving config {path!r} cannot be read as UTF-8 text: {exc}") from None
        message = config_pb2.GeneralModelConfig()
        try:
            text_format.Parse(text, message)
        except (text_format.ParseError, RecursionError) as exc:
            raise ConfigError(f"serving config {path!r} is not a GeneralModelConfig in text format: {exc}") from exc
        return cls.from_proto(message, source=path)

    @classmethod
    def from_proto(cls, message: config_pb2.GeneralModelConfig, source: str = "") -> ServingConfig:
        """Raises ConfigError naming the variable for an elem_type without a numpy dtype here."""
        feeds = tuple(_spec(v, v.feed_type, "feed", source) for v in message.feed_var)
        fetches = tuple(_spec(v, v.fetch_type, "fetch", source) for v in message.fetch_var)
        return cls(feeds=feeds, fetches=fetches, source=source)

    # -- writing -------------------------------------------------------------------------------------
    def to_proto(self) -> config_pb2.GeneralModelConfig:
        message = config_pb2.GeneralModelConfig()
        for spec in self.feeds:
            message.feed_var.append(config_pb2.FeedVar(
                name=spec.name, alias_name=spec.alias_name, is_lod_tensor=spec.is_lod_tensor,
                feed_type=spec.elem_type, shape=list(spec.shape)))
        for spec in self.fetches:
            message.fetch_var.append(config_pb2.FetchVar(
                name=spec.name, alias_name=spec.alias_name, is_lod_tensor=spec.is_lod_tensor,
                fetch_type=spec.elem_type, shape=list(spec.shape)))
        return message

    def save(self, folder: Union[str, os.PathLike], conf_name: str) -> str:
        """Write ``conf_name`` (text) and its ``.stream`` binary twin into ``folder``; returns the text path."""
        folder = os.fspath(folder)
        os.makedirs(folder, exist_ok=True)
        message = self.to_proto()
        text_path = os.path.join(folder, conf_name)
        atomic_write(text_path, text_format.MessageToString(message).encode("utf-8"))
        atomic_write(os.path.join(folder, stream_name(conf_name)), message.SerializeToString())
        return text_path


def _spec(var, elem_type: int, kind: str, source: str) -> VarSpec:
    if int(elem_type) not in ELEM_TYPES:   # checked once here, not at the first request that uses it
        where = f" in {source!r}" if source else ""
        raise ConfigError(f"{kind} {var.alias_name or var.name!r}{where}: elem_type {elem_type} is not a numeric "
                          f"type this project supports (supported: {sorted(ELEM_TYPES)})")
    return VarSpec(name=var.name, alias_name=var.alias_name or var.name, elem_type=int(elem_type),
                   shape=tuple(int(d) for d in var.shape), is_lod_tensor=bool(var.is_lod_tensor))


def _lookup(specs: Sequence[VarSpec], alias: str, kind: str, source: str) -> VarSpec:
    for spec in specs:
        if spec.alias_name == alias:
            return spec
    for spec in specs:
        if spec.name == alias:
            return spec
    where = f" in {source}" if source else ""
    raise ConfigError(f"unknown {kind} {alias!r}{where}; the model's {kind} vars are {_names(specs)}")


def _names(specs: Iterable[VarSpec]) -> list[str]:
    return [s.alias_name for s in specs]
