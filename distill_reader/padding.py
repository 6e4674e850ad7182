"""How padded variable-length feeds are filled: the pad value per feed and the lengths feeds.

A *padded* feed has a ``-1`` in its per-sample shape and is not a LoD tensor (Paddle 3 / PIR's way to take
sequences). The client pads the samples of one request to the longest with ``pad_value`` and, for a feed listed
in ``lengths_feeds`` (``{"words": "length"}``), fills the lengths feed with each sample's length (its first ``-1``
dimension). ``TeacherClient`` and ``DistillReader`` take both options and check them here: their types when
given, their feed names and values against the teacher's serving config when it is known.

- ``pad_value``: one number for every padded feed, or a dict ``{feed: number}`` (feeds left out pad with 0);
  the number must fit the feed's dtype (an integer for integer feeds, in range).
- ``lengths_feeds``: ``{padded feed: lengths feed}``; a lengths feed is a fixed-shape numeric feed of one value per
  sample, given by no more than one padded feed and not padded itself.

Example::

    padding = Padding.create(pad_value={"words": 7}, lengths_feeds={"words": "length"})
    padding.check_config(config)          # PaddingOptionError naming the option and the feed
    padding.value_for("words")            # 7
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Union

import numpy as np

from distill_base.serving_config import ConfigError, ServingConfig, VarSpec

PadValue = Union[int, float, Mapping[str, Union[int, float]]]


class PaddingOptionError(ValueError):
    """A ``pad_value`` or ``lengths_feeds`` option that cannot work; the message names the option and the feed."""


def is_padded(spec: VarSpec) -> bool:
    """True for a padded feed: a ``-1`` per-sample dimension, not a LoD tensor."""
    return not spec.is_lod_tensor and any(d < 0 for d in spec.shape)


@dataclass(frozen=True)
class Padding:
    """Checked ``pad_value`` and ``lengths_feeds`` (see the module docstring); build it with ``create``."""

    pad_value: PadValue = 0
    lengths_feeds: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def create(cls, pad_value: PadValue = 0, lengths_feeds: Optional[Mapping[str, str]] = None) -> Padding:
        """Check the options' types.

        Raises:
            PaddingOptionError: ``pad_value`` is not a real number or a dict of feed name -> real number;
                ``lengths_feeds`` is not a dict of feed name -> feed name, maps a feed to itself, gives one
                lengths feed to two feeds, or uses a lengths feed as a padded feed.
        """
        if isinstance(pad_value, Mapping):
            pad_value = {_name("pad_value", k): _number(f"pad_value[{k!r}]", v) for k, v in pad_value.items()}
        else:
            pad_value = _number("pad_value", pad_value)
        if lengths_feeds is None:
            lengths_feeds = {}
        if not isinstance(lengths_feeds, Mapping):
            raise PaddingOptionError(f"lengths_feeds must be a dict {{padded feed: lengths feed}}, e.g. "
                                     f"{{'words': 'length'}}, not {type(lengths_feeds).__name__}")
        lengths_feeds = {_name("lengths_feeds", k): _name(f"lengths_feeds[{k!r}]", v)
                         for k, v in lengths_feeds.items()}
        givers: dict[str, str] = {}
        for feed, length in lengths_feeds.items():
            if length == feed:
                raise PaddingOptionError(f"lengths_feeds maps {feed!r} to itself; map the padded feed to the feed "
                                         f"that takes its lengths, e.g. {{'words': 'length'}}")
            if length in lengths_feeds:
                raise PaddingOptionError(f"lengths_feeds: {length!r} is both a padded feed and the lengths feed of "
                                         f"{feed!r}; a lengths feed holds one number per sample")
            if length in givers:
                raise PaddingOptionError(f"lengths_feeds: {givers[length]!r} and {feed!r} both fill the lengths "
                                         f"feed {length!r}; give each padded feed its own")
            givers[length] = feed
        return cls(pad_value, lengths_feeds)

    def value_for(self, feed: str) -> Union[int, float]:
        """The pad value of ``feed`` (0 for a feed a dict leaves out)."""
        return pad_value_for(self.pad_value, feed)

    def settings(self) -> dict[str, Any]:
        """Plain values for a worker process (``Padding.create(**settings)`` rebuilds it)."""
        pad = dict(self.pad_value) if isinstance(self.pad_value, Mapping) else self.pad_value
        return {"pad_value": pad, "lengths_feeds": dict(self.lengths_feeds)}

    def check_config(self, config: ServingConfig) -> None:
        """Check feed names and values against the teacher's serving config.

        Raises:
            PaddingOptionError: a ``pad_value`` key or ``lengths_feeds`` key that is not a padded feed of the
                model, a pad value that does not fit its feed's dtype, a lengths feed that is not a fixed-shape
                numeric feed of one value per sample.
        """
        if isinstance(self.pad_value, Mapping):
            for feed, value in self.pad_value.items():
                spec = _padded_feed(config, "pad_value", feed)
                _check_fits(f"pad_value[{feed!r}]", value, spec)
        else:
            for spec in config.feeds:
                if is_padded(spec):
                    _check_fits("pad_value", self.pad_value, spec)
        for feed, length in self.lengths_feeds.items():
            _padded_feed(config, "lengths_feeds", feed)
            spec = _feed(config, f"lengths_feeds[{feed!r}]", length)
            if (spec.is_lod_tensor or any(d < 0 for d in spec.shape) or int(np.prod(spec.shape)) != 1
                    or spec.dtype.kind not in "iuf"):
                raise PaddingOptionError(
                    f"lengths_feeds[{feed!r}] = {length!r}: the lengths feed must hold one number per sample, but "
                    f"{length!r} is {spec.dtype} with per-sample shape {list(spec.shape)}"
                    f"{' (a LoD tensor)' if spec.is_lod_tensor else ''}")


def pad_value_for(pad_value: PadValue, feed: str) -> Union[int, float]:
    """The pad value of ``feed``: ``pad_value`` itself, or its entry (default 0) when it is a dict."""
    if isinstance(pad_value, Mapping):
        return pad_value.get(feed, 0)
    return pad_value


def _name(option: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise PaddingOptionError(f"{option}: feed names are non-empty strings, not {value!r}")
    return value


def _number(option: str, value: Any) -> Union[int, float]:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise PaddingOptionError(f"{option} must be a real number (or, for pad_value, a dict {{feed: number}}), "
                                 f"not {value!r} ({type(value).__name__})")
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def _feed(config: ServingConfig, option: str, name: str) -> VarSpec:
    try:
        return config.feed(name)
    except ConfigError:
        raise PaddingOptionError(f"{option}: {name!r} is not a feed of the teacher; its feeds are "
                                 f"{config.feed_names}{f' ({config.source})' if config.source else ''}") from None


def _padded_feed(config: ServingConfig, option: str, name: str) -> VarSpec:
    spec = _feed(config, option, name)
    if not is_padded(spec):
        kind = "is a LoD tensor (its samples are not padded)" if spec.is_lod_tensor else \
            f"has the fixed per-sample shape {list(spec.shape)}"
        raise PaddingOptionError(f"{option}: feed {name!r} {kind}; only feeds with a -1 dimension are padded")
    return spec


def _check_fits(option: str, value: Union[int, float], spec: VarSpec) -> None:
    dtype = spec.dtype
    if dtype.kind == "f":
        if math.isfinite(value) and abs(value) > float(np.finfo(dtype).max):
            raise PaddingOptionError(f"{option} = {value} does not fit feed {spec.alias_name!r} ({dtype})")
        return
    info = np.iinfo(dtype) if dtype.kind in "iu" else None
    integral = isinstance(value, int) or (math.isfinite(value) and float(value).is_integer())
    low, high = (info.min, info.max) if info is not None else (0, 1)
    if not integral or not low <= int(value) <= high:
        raise PaddingOptionError(f"{option} = {value} does not fit feed {spec.alias_name!r} ({dtype}): give an "
                                 f"integer in [{low}, {high}]")
