"""Export Paddle inference models as Paddle Serving model folders (same API and layout as
``paddle_serving_client.io`` 0.9).

A server folder holds the inference model (``model.pdmodel`` + ``params.pdiparams`` for a legacy program;
``model.json`` + ``params.pdiparams`` for a paddle 3 PIR program),
``serving_server_conf.prototxt`` and its binary twin ``serving_server_conf.stream.prototxt``; the client
folder holds ``serving_client_conf.prototxt`` (+ ``.stream``).

Example::

    from teachers.export import inference_model_to_serving
    feeds, fetches = inference_model_to_serving("mnist_infer", "serving_server", "serving_client",
                                                fetch_alias_names="prediction")

CLI: ``python -m teachers.export --dirname mnist_infer --fetch_alias_names prediction``.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import logging
import os
import re
import sys
import tempfile
from typing import Optional, Sequence, Union

import numpy as np  # noqa: F401  (numpy before paddle: paddle 2.6.2 exports zlib symbols)

from distill_base.atomic_file import atomic_write
from distill_base.cli_help import DefaultsHelpFormatter
from distill_base.paddle_compat import import_paddle, is_pir_program, keep_mode, legacy_ir, paddle_major, pir_ir
from distill_base.serving_config import CLIENT_CONF, SERVER_CONF, ServingConfig, VarSpec
from distill_base.tensor_codec import elem_type_of_dtype

logger = logging.getLogger(__name__)

DEFAULT_MODEL_FILENAME = "model.pdmodel"
DEFAULT_PARAMS_FILENAME = "params.pdiparams"
PIR_MODEL_FILENAME = "model.json"  # a paddle 3 PIR program in a server folder (with params.pdiparams)
_BFLOAT16_ELEM_TYPE = 6

AliasNames = Union[None, str, Sequence[str]]
PathArg = Union[str, "os.PathLike[str]"]   # every path argument: str or os.PathLike (pathlib.Path)


class ExportError(ValueError):
    """A model that cannot be found, read or exported; the message names the path."""


def save_model(server_model_folder: PathArg, client_config_folder: PathArg, feed_var_dict: dict, fetch_var_dict: dict,
               main_program=None, model_filename: Optional[str] = None, params_filename: Optional[str] = None,
               feed_alias_names: AliasNames = None, fetch_alias_names: AliasNames = None,
               scope=None) -> tuple[list[str], list[str]]:
    """Save ``main_program`` (default: the default main program) as a Paddle Serving model.

    ``feed_var_dict`` / ``fetch_var_dict`` map alias names to static variables of the program (paddle 3 PIR
    programs: their ``Value``s); the parameters are read from ``scope`` (default: the global scope). Fetch vars
    are written sorted by alias. A legacy program is written as ``model.pdmodel``, a PIR program as ``model.json``
    (with ``params.pdiparams`` both). Returns the feed and fetch alias names.

    Example::

        save_model("serving_server", "serving_client", {"img": img}, {"prediction": pred}, main_program)
    """
    server_model_folder, client_config_folder = os.fspath(server_model_folder), os.fspath(client_config_folder)
    paddle = import_paddle("teachers.export.save_model")

    if main_program is None:
        main_program = paddle.static.default_main_program()
    scope = scope if scope is not None else paddle.static.global_scope()
    feed_items = list(feed_var_dict.items())
    fetch_items = sorted(fetch_var_dict.items(), key=lambda kv: kv[0])
    feed_aliases = _aliases(feed_alias_names, [k for k, _ in feed_items], "feed")
    fetch_aliases = _aliases(fetch_alias_names, [k for k, _ in fetch_items], "fetch")
    feed_vars = [v for _, v in feed_items]
    fetch_vars = [v for _, v in fetch_items]

    exe = paddle.static.Executor(paddle.CPUPlace())
    if is_pir_program(main_program):
        with tempfile.TemporaryDirectory(prefix="distill_export_") as tmp, paddle.static.scope_guard(scope):
            paddle.static.save_inference_model(os.path.join(tmp, "model"), feed_vars, fetch_vars, exe,
                                               program=main_program)
            return _export_pir(paddle, os.path.join(tmp, "model.json"), os.path.join(tmp, "model.pdiparams"),
                               server_model_folder, client_config_folder, feed_aliases, fetch_aliases,
                               model_filename, params_filename)
    with legacy_ir(paddle), paddle.static.scope_guard(scope):
        program_bytes = paddle.static.serialize_program(feed_vars, fetch_vars, program=main_program)
        params_bytes = paddle.static.serialize_persistables(feed_vars, fetch_vars, exe, program=main_program)
        return _write_serving_model(server_model_folder, client_config_folder, program_bytes, params_bytes,
                                    feed_aliases, fetch_aliases, model_filename, params_filename)


def _write_serving_model(server_model_folder: str, client_config_folder: str, program_bytes: bytes,
                         params_bytes: Optional[bytes], feed_aliases: list[str], fetch_aliases: list[str],
                         model_filename: Optional[str], params_filename: Optional[str]) -> tuple[list[str], list[str]]:
    """Write a legacy program's files and both configs; var names and types are read back from the saved program."""
    import paddle

    # Saving may rename fetch targets (normalization appends scale ops): read the real names from the bytes.
    saved = paddle.static.deserialize_program(program_bytes)
    feed_names, fetch_names = _feed_fetch_targets(saved)
    if len(feed_names) != len(feed_aliases) or len(fetch_names) != len(fetch_aliases):
        raise ExportError(f"saved program has feeds {feed_names} and fetches {fetch_names}, "
                          f"expected {len(feed_aliases)} feeds and {len(fetch_aliases)} fetches")
    block = saved.global_block()
    feeds = [_var_spec(block.var(n), alias) for n, alias in zip(feed_names, feed_aliases)]
    fetches = [_var_spec(block.var(n), alias) for n, alias in zip(fetch_names, fetch_aliases)]
    files = {model_filename or DEFAULT_MODEL_FILENAME: program_bytes,
             params_filename or DEFAULT_PARAMS_FILENAME: params_bytes or b""}
    return _write_folders(server_model_folder, client_config_folder, files, feeds, fetches)


def _write_folders(server_model_folder: str, client_config_folder: str, files: dict[str, bytes],
                   feeds: list[VarSpec], fetches: list[VarSpec]) -> tuple[list[str], list[str]]:
    """Model files first, each atomically (temp file, fsync, rename), then the configs that make the folder whole."""
    os.makedirs(server_model_folder, exist_ok=True)
    for name, data in files.items():
        atomic_write(os.path.join(server_model_folder, name), data)
    config = ServingConfig(feeds=tuple(feeds), fetches=tuple(sorted(fetches, key=lambda spec: spec.alias_name)))
    config.save(server_model_folder, SERVER_CONF)
    config.save(client_config_folder, CLIENT_CONF)
    logger.info("saved serving model: server folder %s, client config %s; feeds %s, fetches %s",
                server_model_folder, client_config_folder, config.feed_names, config.fetch_names)
    return config.feed_names, config.fetch_names


def inference_model_to_serving(dirname: PathArg, serving_server: PathArg = "serving_server",
                               serving_client: PathArg = "serving_client", model_filename: Optional[str] = None,
                               params_filename: Optional[str] = None, feed_alias_names: AliasNames = None,
                               fetch_alias_names: AliasNames = None) -> tuple[list[str], list[str]]:
    """Convert an inference model (``paddle.static.save_inference_model``, ``paddle.jit.save`` or the old
    ``__model__`` layouts) into a Paddle Serving server folder and client config folder.

    ``dirname`` is the model folder (or a ``paddle.jit.save`` path prefix). Without file names the model
    file is found in the folder (one ``*.pdmodel``, ``__model__`` with ``__params__`` or one file per
    parameter, or a paddle 3 PIR model: one ``*.json`` with its ``*.pdiparams``). Alias names default to the
    variable names; ``fetch_alias_names="prediction"`` (comma separated string or list) renames them.
    Returns the feed and fetch alias names. Paddle's dynamic/static mode is the same after the call as before.

    Server folder files: a legacy program becomes ``model.pdmodel`` + ``params.pdiparams``; a PIR model (paddle 3)
    is copied as ``model.json`` + ``params.pdiparams``. Legacy ``.pdmodel`` models export and serve on paddle 3
    too; PIR models need paddle 3.

    Example::

        inference_model_to_serving("jit_model", fetch_alias_names="prediction")
    """
    dirname, serving_server, serving_client = os.fspath(dirname), os.fspath(serving_server), os.fspath(serving_client)
    paddle = import_paddle("teachers.export")
    prefix, kwargs = _locate_model(dirname, model_filename, params_filename)
    model_path = (os.path.join(prefix, kwargs["model_filename"]) if kwargs.get("model_filename")
                  else prefix + (".json" if _is_pir_file(prefix + ".json") else ".pdmodel"))
    with keep_mode(paddle):
        paddle.enable_static()
        if model_path.endswith(".json"):
            params_path = (os.path.join(prefix, kwargs["params_filename"]) if kwargs.get("params_filename")
                           else os.path.splitext(model_path)[0] + ".pdiparams")
            return _export_pir(paddle, model_path, params_path, serving_server, serving_client,
                               feed_alias_names, fetch_alias_names, None, None)
        with legacy_ir(paddle):
            return _export_legacy(paddle, dirname, prefix, kwargs, serving_server, serving_client,
                                  feed_alias_names, fetch_alias_names)


def _export_legacy(paddle, dirname: str, prefix: str, kwargs: dict, serving_server: str, serving_client: str,
                   feed_alias_names: AliasNames, fetch_alias_names: AliasNames) -> tuple[list[str], list[str]]:
    exe = paddle.static.Executor(paddle.CPUPlace())
    scope = paddle.static.Scope()
    with paddle.static.scope_guard(scope):
        try:
            program, feed_names, fetch_targets = paddle.static.load_inference_model(prefix, exe, **kwargs)
        except Exception as exc:  # paddle raises many types; name the model in one error
            hint = ("; there is no *.pdiparams next to it: if the model has parameters, give its file as "
                    "params_filename" if kwargs.get("model_filename") and not kwargs.get("params_filename") else "")
            raise ExportError(f"cannot load inference model from {dirname!r} ({kwargs or prefix}){hint}: "
                              f"{exc}") from exc
    block = program.global_block()
    feed_vars = [block.var(name) for name in feed_names]
    with paddle.static.scope_guard(scope):
        params_bytes = paddle.static.serialize_persistables(feed_vars, fetch_targets, exe, program=program)
    # The loaded program already is an inference program (feed/fetch ops): write it as it is.
    return _write_serving_model(serving_server, serving_client, program.desc.serialize_to_string(), params_bytes,
                                _aliases(feed_alias_names, list(feed_names), "feed"),
                                _aliases(fetch_alias_names, [v.name for v in fetch_targets], "fetch"), None, None)


def _export_pir(paddle, model_path: str, params_path: str, serving_server: str, serving_client: str,
                feed_alias_names: AliasNames, fetch_alias_names: AliasNames, model_filename: Optional[str],
                params_filename: Optional[str]) -> tuple[list[str], list[str]]:
    """A paddle 3 PIR model (``*.json`` + ``*.pdiparams``): read its feeds and fetches, copy both files as they are."""
    if paddle_major(paddle) < 3:
        raise ExportError(f"{model_path} is a paddle 3 (PIR) model; paddle {paddle.__version__} cannot read it "
                          "(export it with paddle 3, or save the model as a legacy .pdmodel program)")
    exe = paddle.static.Executor(paddle.CPUPlace())
    folder = os.path.dirname(model_path) or "."
    params_name = os.path.basename(params_path) if os.path.exists(params_path) else None
    with keep_mode(paddle), pir_ir(paddle), paddle.static.scope_guard(paddle.static.Scope()):
        paddle.enable_static()
        try:
            program, _, _ = paddle.static.load_inference_model(
                folder, exe, model_filename=os.path.basename(model_path), params_filename=params_name)
        except Exception as exc:  # paddle raises many types; name the model in one error
            hint = ("; there is no *.pdiparams next to it: if the model has parameters, give its file as "
                    "params_filename" if params_name is None else "")
            raise ExportError(f"cannot load PIR inference model {model_path!r}{hint}: {exc}") from exc
        feeds, fetches = _pir_feed_fetch_specs(program, warn_unnamed=not fetch_alias_names)
    feed_aliases = _aliases(feed_alias_names, [s.name for s in feeds], "feed")
    fetch_aliases = _aliases(fetch_alias_names, [s.name for s in fetches], "fetch")
    feeds = [dataclasses.replace(s, alias_name=a) for s, a in zip(feeds, feed_aliases)]
    fetches = [dataclasses.replace(s, alias_name=a) for s, a in zip(fetches, fetch_aliases)]
    files = {model_filename or PIR_MODEL_FILENAME: _read(model_path),
             params_filename or DEFAULT_PARAMS_FILENAME: _read(params_path) if params_name else b""}
    return _write_folders(serving_server, serving_client, files, feeds, fetches)


def _pir_feed_fetch_specs(program, warn_unnamed: bool = False) -> tuple[list[VarSpec], list[VarSpec]]:
    """Feeds (``pd_op.data``, program order) and fetches (``pd_op.fetch``, by column) of a PIR program."""
    feeds: list[VarSpec] = []
    fetches: dict[int, VarSpec] = {}
    for op in program.global_block().ops:
        if op.name() == "pd_op.data":
            name = op.attrs()["name"]
            feeds.append(_value_spec(op.result(0), name))
        elif op.name() == "pd_op.fetch":
            attrs = op.attrs()
            fetches[int(attrs["col"])] = _value_spec(op.operand_source(0),
                                                         _pir_fetch_name(op, attrs["name"], warn_unnamed))
    if not feeds or not fetches:
        raise ExportError(f"PIR program has {len(feeds)} feeds (pd_op.data) and {len(fetches)} fetches "
                          "(pd_op.fetch); an inference model needs both")
    return feeds, [fetches[i] for i in sorted(fetches)]


_GENERATED_FETCH_NAME = re.compile(r"fetch_name_\d+")


def _pir_fetch_name(op, name: str, warn_unnamed: bool) -> str:
    """A PIR fetch's name: the fetch op's own unless generated (``fetch_name_N``), then the output value's if named.

    PIR names only data, parameter and persistable values; a model output computed by an op has no name, so the
    generated one stays and a warning says how to give it one.
    """
    if not _GENERATED_FETCH_NAME.fullmatch(name):
        return name
    value = op.operand_source(0)
    if getattr(value, "has_name", False):
        return value.name
    if not warn_unnamed:
        return name
    producer = value.get_defining_op().name() if value.get_defining_op() is not None else "?"
    logger.warning("PIR model output %r (computed by %s, shape %s) has no name in the program (PIR keeps names "
                   "of data and parameter values only); clients must fetch it as %r unless you export with "
                   "--fetch_alias_names NAME[,NAME...] (Python: fetch_alias_names=...), one name per output in "
                   "fetch order", name, producer, list(value.shape), name)
    return name


def _value_spec(value, name: str) -> VarSpec:
    shape = [int(d) for d in value.shape]
    if shape and shape[0] < 0:  # the batch dimension
        shape = shape[1:]
    return VarSpec(name=name, alias_name=name, elem_type=_elem_type_of(value.dtype, name), shape=tuple(shape),
                   is_lod_tensor=False)


# -- helpers ---------------------------------------------------------------------------------------------
def _locate_model(dirname: str, model_filename: Optional[str],
                  params_filename: Optional[str]) -> tuple[str, dict]:
    """(path, kwargs) for paddle.static.load_inference_model."""
    if model_filename or params_filename:
        if not os.path.isdir(dirname):
            raise ExportError(f"model folder {dirname!r} does not exist")
        return dirname, {"model_filename": model_filename, "params_filename": params_filename}
    if not os.path.isdir(dirname):
        if os.path.exists(dirname + ".pdmodel") or _is_pir_file(dirname + ".json"):
            return dirname, {}
        raise ExportError(f"no model folder {dirname!r} and no {dirname}.pdmodel or {dirname}.json")
    if os.path.exists(os.path.join(dirname, "__model__")):
        params = "__params__" if os.path.exists(os.path.join(dirname, "__params__")) else None
        return dirname, {"model_filename": "__model__", "params_filename": params}
    models = sorted(glob.glob(os.path.join(dirname, "*.pdmodel")))
    if not models:
        models = [m for m in sorted(glob.glob(os.path.join(dirname, "*.json"))) if _is_pir_file(m)]
    if len(models) != 1:
        raise ExportError(f"model folder {dirname!r} holds {len(models)} *.pdmodel files (or paddle 3 *.json "
                          f"models with their *.pdiparams) ({[os.path.basename(m) for m in models]}); "
                          "pass model_filename and params_filename")
    stem = os.path.splitext(models[0])[0]
    params = [p for p in (stem + ".pdiparams",) if os.path.exists(p)] or glob.glob(os.path.join(dirname, "*.pdiparams"))
    if len(params) > 1:
        raise ExportError(f"model folder {dirname!r}: cannot tell which of {sorted(map(os.path.basename, params))} "
                          f"belongs to {os.path.basename(models[0])}; pass params_filename")
    # No *.pdiparams: a model without parameters (paddle writes none); loading says so if it has some.
    return dirname, {"model_filename": os.path.basename(models[0]),
                     "params_filename": os.path.basename(params[0]) if params else None}


def _feed_fetch_targets(program) -> tuple[list[str], list[str]]:
    feeds: dict[int, str] = {}
    fetches: dict[int, str] = {}
    for op in program.global_block().ops:
        if op.type == "feed":
            feeds[op.attr("col")] = op.output("Out")[0]
        elif op.type == "fetch":
            fetches[op.attr("col")] = op.input("X")[0]
    return [feeds[i] for i in sorted(feeds)], [fetches[i] for i in sorted(fetches)]


def _var_spec(var, alias: str) -> VarSpec:
    shape = [int(d) for d in var.shape]
    if shape and shape[0] < 0:  # the batch dimension
        shape = shape[1:]
    lod = int(getattr(var, "lod_level", 0) or 0) > 0
    if lod:
        shape = [-1]
    return VarSpec(name=var.name, alias_name=alias, elem_type=_elem_type(var), shape=tuple(shape),
                   is_lod_tensor=lod)


def _elem_type(var) -> int:
    return _elem_type_of(var.dtype, var.name)


def _elem_type_of(dtype, name: str) -> int:
    from paddle.base.data_feeder import convert_dtype

    dtype_name = convert_dtype(dtype)
    if dtype_name == "uint16" or dtype_name == "bfloat16":
        return _BFLOAT16_ELEM_TYPE
    return elem_type_of_dtype(dtype_name, what=f"variable {name!r}")


def _is_pir_file(path: str) -> bool:
    """A paddle 3 PIR model file: ``*.json`` whose first bytes are PIR's header (``"magic":"pir"``); its
    ``*.pdiparams`` beside it unless the model has no parameters."""
    if not (path.endswith(".json") and os.path.isfile(path)):
        return False
    with open(path, "rb") as f:
        return b'"magic":"pir"' in f.read(256).replace(b" ", b"")


def _aliases(given: AliasNames, default: list[str], kind: str) -> list[str]:
    if given is None or given == "":
        return default
    names = [n.strip() for n in given.split(",")] if isinstance(given, str) else [str(n) for n in given]
    if len(names) != len(default):
        raise ExportError(f"{len(names)} {kind} alias names {names} for {len(default)} {kind} vars {default}")
    return names


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# -- CLI -------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m teachers.export", formatter_class=DefaultsHelpFormatter,
        description="Convert a Paddle inference model into a Paddle Serving server folder and client config "
                    "folder (the layout of paddle_serving_client.convert).")
    parser.add_argument("--dirname", required=True,
                        help="folder of the inference model (or a paddle.jit.save path prefix)")
    parser.add_argument("--serving_server", default="serving_server",
                        help="server folder to write: model + serving_server_conf.prototxt (default: %(default)s)")
    parser.add_argument("--serving_client", default="serving_client",
                        help="client folder to write: serving_client_conf.prototxt (default: %(default)s)")
    parser.add_argument("--model_filename", default=None,
                        help="model file inside --dirname (default: found: one *.pdmodel or __model__)")
    parser.add_argument("--params_filename", default=None,
                        help="params file inside --dirname (default: found; none for one file per parameter)")
    parser.add_argument("--feed_alias_names", default=None,
                        help="comma separated alias names for the feed vars, in model order (default: var names)")
    parser.add_argument("--fetch_alias_names", default=None,
                        help="comma separated alias names for the fetch vars, in model order (default: var names)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    import_paddle("teachers.export")  # before logging setup: importing paddle 2.6 sets the root logger to WARNING
    logging.basicConfig(level=logging.INFO, force=True, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        feeds, fetches = inference_model_to_serving(
            args.dirname, args.serving_server, args.serving_client, args.model_filename, args.params_filename,
            feed_alias_names=args.feed_alias_names, fetch_alias_names=args.fetch_alias_names)
    except ExportError as exc:
        logger.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
