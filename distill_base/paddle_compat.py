"""PaddlePaddle is the user's choice (CPU or GPU wheel, 2.6 or 3.x): import it with a clear error, tell lines apart.

distill-reader supports paddle 2.6.2 and 3.x (tested on 3.3.1). Paddle 3 builds static programs in PIR (the new
intermediate representation, ``paddle.base.libpaddle.pir.Program``) unless ``FLAGS_enable_pir_api=0`` is set
before paddle is imported; paddle 2.6 only has the legacy ``paddle.static.Program``.

Example::

    from distill_base.paddle_compat import import_paddle, pir_enabled
    paddle = import_paddle("teachers.export")      # ImportError naming the extras when paddle is missing
    if pir_enabled(paddle):
        ...
"""
from __future__ import annotations

import contextlib
import importlib
from typing import Any, Iterator

import numpy  # noqa: F401  (numpy before paddle: paddle 2.6.2 exports zlib symbols)

INSTALL_HINT = ("install PaddlePaddle (2.6.2 or 3.x) yourself or through an extra of distill-reader: "
                "pip install 'distill-reader[cpu]' (the paddlepaddle wheel) or 'distill-reader[gpu]' "
                "(the paddlepaddle-gpu wheel); install only one of the two, both provide the same `paddle` package")

LEGACY_HINT = ("set the environment variable FLAGS_enable_pir_api=0 before paddle is imported (or build and use "
               "the programs inside `with paddle.pir_utils.OldIrGuard():`) so that paddle 3 builds legacy "
               "static programs")


def import_paddle(what: str) -> Any:
    """``import paddle``; without it an ImportError that names ``what`` (the part needing paddle) and both extras.

    Raises:
        ImportError: paddle is not installed; names ``what`` and the ``[cpu]``/``[gpu]`` extras.
    """
    try:
        return importlib.import_module("paddle")
    except ImportError as exc:
        raise ImportError(f"{what} needs PaddlePaddle, which is not installed: {INSTALL_HINT}") from exc


def paddle_major(paddle: Any) -> int:
    """The major version of the imported paddle (0 for a development build reported as 0.0.0 is taken as 3)."""
    major = int(str(paddle.__version__).split(".")[0] or 0)
    return major if major > 0 else 3


def pir_enabled(paddle: Any) -> bool:
    """True when static programs are PIR programs (paddle 3 with ``FLAGS_enable_pir_api`` on, its default)."""
    if paddle_major(paddle) < 3:
        return False
    try:
        return bool(paddle.get_flags(["FLAGS_enable_pir_api"])["FLAGS_enable_pir_api"])
    except (ValueError, KeyError, AttributeError):
        return False


def is_pir_program(program: Any) -> bool:
    """True for a paddle 3 PIR ``Program`` (which has no named variables or ``global_block().vars``)."""
    return "pir" in type(program).__module__.split(".")


@contextlib.contextmanager
def legacy_ir(paddle: Any) -> Iterator[None]:
    """Static APIs in legacy-program mode for the block: ``paddle.pir_utils.OldIrGuard`` on paddle 3, nothing on 2.6."""
    guard = getattr(getattr(paddle, "pir_utils", None), "OldIrGuard", None) if paddle_major(paddle) >= 3 else None
    if guard is None:
        yield
        return
    with guard():
        yield


@contextlib.contextmanager
def pir_ir(paddle: Any) -> Iterator[None]:
    """Static APIs in PIR mode for the block (paddle 3 only): ``paddle.pir_utils.IrGuard``."""
    with paddle.pir_utils.IrGuard():
        yield


@contextlib.contextmanager
def keep_mode(paddle: Any) -> Iterator[None]:
    """Restore paddle's dynamic (dygraph) or static mode on exit, whatever the block switched to."""
    dynamic = paddle.in_dynamic_mode()
    try:
        yield
    finally:
        if dynamic and not paddle.in_dynamic_mode():
            paddle.disable_static()
        elif not dynamic and paddle.in_dynamic_mode():
            paddle.enable_static()
