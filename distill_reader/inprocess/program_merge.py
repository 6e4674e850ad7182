"""Merge a static teacher program into a student program (PaddleSlim's ``dist.merge`` recipe, multi-block aware).

Every teacher variable is renamed ``name_prefix + name`` unless ``data_name_map`` maps it (teacher input name ->
student input name); the teacher's persistable tensors are copied into ``scope`` under their new names; all teacher
variables are stop_gradient plain variables (not Parameters, so optimizers and student checkpoints leave them
alone); every block of the teacher is copied (``cond`` / ``while_loop`` sub-blocks get new blocks in the student
and the ``sub_block`` attributes point at them), and the teacher's ops are appended after the student's.

Example::

    import paddle
    from distill_reader import dist
    names = dist.merge(teacher_program, student_program, {"y": "x"}, paddle.CPUPlace(), teacher_scope=t_scope)
    names["fc_0.tmp_1"]   # -> "teacher_fc_0.tmp_1"
"""
from __future__ import annotations

import logging

import numpy as np
import paddle
from paddle.base import core
from paddle.base.framework import Operator

from .names import closest_names, record_teacher_copies
from .pir import require_legacy
from .shapes import ShapeMismatchError, dims_compatible

__all__ = ["merge", "MergeError"]

logger = logging.getLogger(__name__)

_VarType = core.VarDesc.VarType
_SKIPPED_NAMES = {"feed", "fetch", "", core.kEmptyVarName()}
_SKIPPED_OPS = {"feed", "fetch"}
_TENSOR_TYPES = {_VarType.LOD_TENSOR, _VarType.SELECTED_ROWS, _VarType.LOD_TENSOR_ARRAY}


class MergeError(ValueError):
    """A teacher program that cannot be merged into the student program as asked."""


def merge(teacher_program, student_program, data_name_map: dict[str, str], place, scope=None,
          name_prefix: str = "teacher_", teacher_scope=None) -> dict[str, str]:
    """Append ``teacher_program`` (cloned for test) to ``student_program``.

    Args:
        teacher_program: the teacher's static Program (its parameters must be in ``teacher_scope``).
        student_program: the student's static Program; modified in place.
        data_name_map: teacher input name -> student input name; those teacher inputs read the student's.
        place: the device the copied teacher tensors are placed on (``paddle.CPUPlace()``).
        scope: the scope the merged program runs in (default: the global scope); teacher tensors are copied here.
        name_prefix: prefix of every other teacher variable name.
        teacher_scope: the scope holding the teacher's parameters (default: ``scope``). Pass it whenever the
            teacher and the student were built with the same generated names (e.g. both ``fc_0.w_0``).

    Returns:
        dict teacher variable name -> its name in the merged program.

    Raises:
        MergeError: a bad ``data_name_map``; a teacher tensor whose shape or dtype differs from the teacher
            program's declaration; a teacher persistable whose name the student also uses while the teacher's
            tensors are read from ``scope`` (pass ``teacher_scope``); the message names the variable.
        PirProgramError: a paddle 3 PIR program (set ``FLAGS_enable_pir_api=0`` before importing paddle).
    """
    require_legacy("dist.merge", teacher_program=teacher_program, student_program=student_program)
    scope = paddle.static.global_scope() if scope is None else scope
    teacher_scope = scope if teacher_scope is None else teacher_scope
    data_name_map = dict(data_name_map or {})
    teacher = teacher_program.clone(for_test=True)
    _check_data_name_map(teacher, student_program, data_name_map)
    _check_ops(teacher)

    def rename(name: str) -> str:
        if name in _SKIPPED_NAMES:
            return name
        return data_name_map.get(name, name_prefix + name)

    teacher_names = {v.name for block in teacher.blocks for v in block.vars.values() if v.name not in _SKIPPED_NAMES}
    name_map = {name: rename(name) for name in sorted(teacher_names)}
    _check_collisions(student_program, name_map, data_name_map, name_prefix)
    _copy_persistables(teacher, student_program, rename, place, scope, teacher_scope)
    block_map = _create_blocks(teacher, student_program)
    _clone_vars(teacher, student_program, block_map, rename, data_name_map)
    _append_ops(teacher, student_program, block_map, rename)
    record_teacher_copies(student_program, {new: old for old, new in name_map.items()
                                            if old not in data_name_map and new != old})
    logger.info("merged teacher: %d variables, %d blocks, %d ops", len(name_map), len(teacher.blocks),
                sum(len(b.ops) for b in teacher.blocks))
    return name_map


def _check_data_name_map(teacher, student, data_name_map: dict[str, str]) -> None:
    t_block, s_block = teacher.global_block(), student.global_block()
    for t_name, s_name in data_name_map.items():
        if not t_block.has_var(t_name):
            hint = closest_names(t_name, t_block.vars.keys())
            raise MergeError(f"data_name_map key {t_name!r} is not a variable of the teacher program"
                             + (f"; closest names: {', '.join(map(repr, hint))}" if hint else "")
                             + " (keys are teacher input names, values student input names)")
        if not s_block.has_var(s_name):
            hint = closest_names(s_name, s_block.vars.keys())
            raise MergeError(f"data_name_map value {s_name!r} (for teacher {t_name!r}) is not a variable of the "
                             "student program" + (f"; closest names: {', '.join(map(repr, hint))}" if hint else ""))
        t_var, s_var = t_block.var(t_name), s_block.var(s_name)
        if t_var.type in _TENSOR_TYPES and s_var.type in _TENSOR_TYPES:
            if not dims_compatible(t_var.shape, s_var.shape):
                raise ShapeMismatchError(f"data_name_map: teacher input {t_name!r} has shape {list(t_var.shape)} but "
                                         f"student input {s_name!r} has shape {list(s_var.shape)}")
            if t_var.dtype != s_var.dtype:
                raise MergeError(f"data_name_map: teacher input {t_name!r} has dtype {t_var.dtype} but student "
                                 f"input {s_name!r} has dtype {s_var.dtype}")


def _check_ops(teacher) -> None:
    """Refuse, before anything is modified, ops whose attributes name variables (merge cannot rename those)."""
    for block in teacher.blocks:
        for op in block.ops:
            for name in op.desc.attr_names():
                if op.desc.attr_type(name) in (core.AttrType.VAR, core.AttrType.VARS):
                    raise MergeError(f"teacher op {op.type!r} (block {block.idx}) has a variable-valued attribute "
                                     f"{name!r}, which merge does not support")


def _check_collisions(student, name_map: dict[str, str], data_name_map: dict[str, str], name_prefix: str) -> None:
    mapped_inputs = set(data_name_map.values())
    s_block = student.global_block()
    clashes = sorted(new for old, new in name_map.items()
                     if new not in mapped_inputs and old not in data_name_map and s_block.has_var(new))
    if clashes:
        raise MergeError(f"teacher variables renamed with prefix {name_prefix!r} clash with student variables "
                         f"{clashes[:8]}{' ...' if len(clashes) > 8 else ''}; choose another name_prefix")


def _used_names(program) -> set[str]:
    used: set[str] = set()
    for block in program.blocks:
        for op in block.ops:
            used.update(op.input_arg_names)
            used.update(op.output_arg_names)
    return used


def _copy_persistables(teacher, student, rename, place, scope, teacher_scope) -> None:
    """Copy the teacher's persistable tensors into ``scope`` under their new names, after checking all of them.

    Nothing is written unless every tensor checks out: it must have the shape and dtype the teacher program
    declares, and it must be the teacher's (a name the student program also uses is refused when the teacher's
    tensors are read from the scope the student was initialized in).
    """
    used = _used_names(teacher)
    student_names = {v.name for block in student.blocks for v in block.vars.values()}
    missing, copies = [], []
    for block in teacher.blocks:
        for var in block.vars.values():
            if not var.persistable or var.name in _SKIPPED_NAMES or var.name not in used:
                continue
            if var.type != _VarType.LOD_TENSOR:
                continue
            new_name = rename(var.name)
            if teacher_scope is scope and new_name == var.name:
                continue
            if teacher_scope is scope and var.name in student_names:
                raise MergeError(
                    f"teacher variable {var.name!r} has the name of a student program variable, and the teacher's "
                    "tensors are read from the scope the student runs in, where that name may hold the student's "
                    "tensor (running the student's startup program after the teacher's overwrites it); pass "
                    "teacher_scope=<the scope the teacher was initialized or loaded in>")
            source = teacher_scope.find_var(var.name)
            if source is None or not source.get_tensor()._is_initialized():
                missing.append(var.name)
                continue
            array = np.array(source.get_tensor())
            _check_tensor(var, array)
            copies.append((new_name, array))
    for new_name, array in copies:
        scope.var(new_name).get_tensor().set(array, place)
    if missing:
        logger.warning("teacher persistable variables not initialized in the teacher scope, not copied (load or "
                       "initialize the teacher before merge, or the merged program cannot run): %s", missing[:10])


def _check_tensor(var, array: np.ndarray) -> None:
    """MergeError unless ``array`` has the shape and dtype the teacher program declares for ``var``."""
    from paddle.base.data_feeder import convert_dtype

    declared = [int(d) for d in var.shape]
    dtype = convert_dtype(var.dtype)
    shape_ok = len(declared) == array.ndim and all(d < 0 or d == a for d, a in zip(declared, array.shape))
    if not shape_ok or np.dtype(dtype) != array.dtype:
        raise MergeError(f"teacher variable {var.name!r}: the teacher scope holds a {array.dtype} tensor of shape "
                         f"{list(array.shape)}, but the teacher program declares {dtype} {declared}; the scope does "
                         "not hold this teacher's parameters (wrong scope or model)")


def _create_blocks(teacher, student) -> dict[int, int]:
    """New student blocks for the teacher's sub-blocks; returns teacher block index -> student block index."""
    block_map = {0: 0}
    current = student.current_block_idx
    try:
        for block in teacher.blocks[1:]:
            if block.parent_idx not in block_map:
                raise MergeError(f"teacher block {block.idx} has parent {block.parent_idx}, which comes after it")
            new_block = student._create_block(parent_idx=block_map[block.parent_idx])
            block_map[block.idx] = new_block.idx
            if block.forward_block_idx >= 0:
                new_block._set_forward_block_idx(block_map.get(block.forward_block_idx, -1))
    finally:
        student.current_block_idx = current
    return block_map


def _clone_vars(teacher, student, block_map: dict[int, int], rename, data_name_map: dict[str, str]) -> None:
    for block in teacher.blocks:
        target = student.block(block_map[block.idx])
        for var in block.vars.values():
            if var.name in _SKIPPED_NAMES or (block.idx == 0 and var.name in data_name_map):
                continue
            kwargs = {"name": rename(var.name), "type": var.type, "persistable": var.persistable,
                      "stop_gradient": True}
            if var.type in _TENSOR_TYPES:
                kwargs.update(shape=var.shape, dtype=var.dtype, lod_level=var.lod_level)
            if var.is_data:
                kwargs.update(is_data=True, need_check_feed=var.desc.need_check_feed())
            target.create_var(**kwargs)


def _append_ops(teacher, student, block_map: dict[int, int], rename) -> None:
    """Copy each teacher op's description (every attribute kept) with renamed arguments and remapped sub-blocks."""
    attr_type = core.AttrType
    for block in teacher.blocks:
        target = student.block(block_map[block.idx])
        for op in block.ops:
            if op.type in _SKIPPED_OPS:
                continue
            desc = target.desc.append_op()
            desc.copy_from(op.desc)
            for slot in op.input_names:
                desc.set_input(slot, [rename(n) for n in op.input(slot)])
            for slot in op.output_names:
                desc.set_output(slot, [rename(n) for n in op.output(slot)])
            for name in op.desc.attr_names():
                kind = op.desc.attr_type(name)
                if kind == attr_type.BLOCK:
                    desc.set_block_attr(name, student.block(block_map[op.desc._block_attr_id(name)]).desc)
                elif kind == attr_type.BLOCKS:
                    desc.set_blocks_attr(name, [student.block(block_map[i]).desc
                                                for i in op.desc._blocks_attr_ids(name)])
            target.ops.append(Operator(target, desc))
