"""A saved teacher inside the training process: ``paddle.jit.load`` for dygraph / to_static, or a static program.

Paddle 3 saves models as PIR ``<prefix>.json`` + ``<prefix>.pdiparams`` (``paddle.jit.save``'s default); paddle 2.6
and paddle 3 in legacy mode (``FLAGS_enable_pir_api=0``) save ``<prefix>.pdmodel``. ``load_teacher`` returns the
teacher as a frozen callable for a dygraph or ``paddle.jit.to_static`` student (the route on paddle 3 that needs no
legacy mode); ``load_teacher_program`` loads it as a legacy static program for ``dist.merge``. Both check the files
first and say what to do when the format cannot be read in the current mode.

Example::

    import paddle
    from distill_reader import dist
    teacher = dist.load_teacher("teacher/inference")          # eval mode, no gradients, outputs detached
    loss = dist.functional.kl_div_loss(student(x), teacher(x), temperature=4.0)
"""
from __future__ import annotations

import logging
import os
from typing import Any

import paddle

from distill_base.paddle_compat import LEGACY_HINT, paddle_major, pir_enabled

from .pir import PirProgramError

__all__ = ["FrozenTeacher", "TeacherFormatError", "load_teacher", "load_teacher_program"]

logger = logging.getLogger(__name__)


class TeacherFormatError(ValueError):
    """A saved teacher whose format (PIR ``.json`` or legacy ``.pdmodel``) this paddle mode cannot read."""


class FrozenTeacher:
    """A loaded teacher layer in eval mode whose parameters take no gradient and whose outputs are detached.

    Call it like the layer: ``teacher(x)`` returns a Tensor (or a tuple of Tensors for several outputs) with
    ``stop_gradient=True``, in dygraph and inside ``paddle.jit.to_static`` functions.
    """

    def __init__(self, layer: Any, path: str):
        self.layer, self.path = layer, path
        layer.eval()
        for param in layer.parameters():
            param.stop_gradient = True

    def __call__(self, *inputs):
        with paddle.no_grad():
            out = self.layer(*inputs)
        if isinstance(out, (list, tuple)):
            return type(out)(o.detach() for o in out)
        return out.detach()

    def parameters(self) -> list:
        """The teacher's parameters (all with ``stop_gradient=True``)."""
        return self.layer.parameters()

    def __repr__(self) -> str:
        return f"FrozenTeacher({self.path!r})"


def _saved_format(path_prefix: str) -> str:
    """``"pir"`` (``.json``) or ``"legacy"`` (``.pdmodel``), preferring the one this mode reads; else raise."""
    found = [fmt for fmt, ext in (("pir", ".json"), ("legacy", ".pdmodel")) if os.path.isfile(path_prefix + ext)]
    if not found:
        raise FileNotFoundError(
            f"no saved model at {path_prefix!r}: expected {path_prefix}.json (paddle 3's paddle.jit.save) or "
            f"{path_prefix}.pdmodel (paddle 2.6 / legacy mode), each beside {path_prefix}.pdiparams; give the path "
            "prefix passed to paddle.jit.save, without extension")
    if not os.path.isfile(path_prefix + ".pdiparams"):
        logger.warning("%s.pdiparams not found: the teacher's parameters may be missing", path_prefix)
    preferred = "pir" if pir_enabled(paddle) else "legacy"
    return preferred if preferred in found else found[0]


def _check_readable(path_prefix: str, fmt: str, api: str) -> None:
    if fmt == "legacy" or pir_enabled(paddle):
        return
    if paddle_major(paddle) < 3:
        how = (f"paddle {paddle.__version__} cannot read it: load it with paddle 3, or save the teacher again with "
               "paddle 2.6 (or with paddle 3 under FLAGS_enable_pir_api=0), which writes .pdmodel")
    else:
        how = ("paddle 3's legacy mode (FLAGS_enable_pir_api=0) cannot read it. Leave legacy mode and distill with "
               "a dygraph or paddle.jit.to_static student (dist.load_teacher + dist.functional losses), or save the "
               "teacher again under FLAGS_enable_pir_api=0 (writes .pdmodel) to merge it into a legacy program")
    raise TeacherFormatError(f"{api}: {path_prefix}.json is a PIR model (paddle 3's default save format) and {how}")


def load_teacher(path_prefix: str) -> FrozenTeacher:
    """Load a teacher saved with ``paddle.jit.save`` as a frozen callable for a dygraph or to_static student.

    The teacher runs on the device paddle uses now (``paddle.get_device()``), like the student built after
    ``paddle.set_device``. Works with ``.json`` (PIR, paddle 3) and ``.pdmodel`` models in dygraph mode.

    Raises:
        FileNotFoundError: neither ``<path_prefix>.json`` nor ``<path_prefix>.pdmodel`` exists.
        TeacherFormatError: a ``.json`` teacher in legacy mode or on paddle 2.6.

    Example::

        teacher = load_teacher("teacher/inference")
        with paddle.no_grad():
            ...
        loss = dist.functional.kl_div_loss(student(x), teacher(x), temperature=2.0)
    """
    path_prefix = os.fspath(path_prefix)
    _check_readable(path_prefix, _saved_format(path_prefix), "dist.load_teacher")
    return FrozenTeacher(paddle.jit.load(path_prefix), path_prefix)


def load_teacher_program(path_prefix: str, executor) -> tuple:
    """``paddle.static.load_inference_model`` for ``dist.merge``: a legacy static program, its feeds and fetches.

    Call it in static mode; load into the scope you pass to ``merge`` as ``teacher_scope`` (``scope_guard``).

    Raises:
        FileNotFoundError: no ``.json`` / ``.pdmodel`` at ``path_prefix``.
        TeacherFormatError: a ``.json`` (PIR) teacher in legacy mode or on paddle 2.6.
        PirProgramError: paddle 3 in PIR mode, where ``dist.merge`` cannot take the program.

    Example::

        with paddle.static.scope_guard(teacher_scope):
            program, feeds, fetches = load_teacher_program("teacher/inference", exe)
        dist.merge(program, student_program, {feeds[0]: "image"}, place, teacher_scope=teacher_scope)
    """
    path_prefix = os.fspath(path_prefix)
    if pir_enabled(paddle):
        raise PirProgramError(
            "dist.load_teacher_program: paddle 3 builds PIR programs, which dist.merge cannot take; use the dygraph "
            "route (dist.load_teacher(path) inside a dygraph or paddle.jit.to_static student, with "
            f"dist.functional losses) or {LEGACY_HINT}")
    _check_readable(path_prefix, _saved_format(path_prefix), "dist.load_teacher_program")
    return paddle.static.load_inference_model(path_prefix, executor)
