"""Small static programs shared by the dist tests: a teacher and a student built in their own name spaces.

``dist.merge`` and the name-addressed losses work on legacy static programs: on paddle 3 ``static_mode()`` builds
and runs them under ``paddle.pir_utils.OldIrGuard`` (the in-process equivalent of FLAGS_enable_pir_api=0, which
tests/inprocess/test_dist_examples.py sets in the environment of the example scripts).
"""
from __future__ import annotations

import contextlib

import numpy as np
import paddle

from distill_base.paddle_compat import keep_mode, legacy_ir, pir_ir


@contextlib.contextmanager
def static_mode():
    """Legacy static graph mode for the duration of a test; dygraph again afterwards."""
    paddle.enable_static()
    try:
        with legacy_ir(paddle):
            yield
    finally:
        paddle.disable_static()


@contextlib.contextmanager
def pir_static_mode():
    """PIR static graph mode (paddle 3 only) for the duration of a test; dygraph again afterwards."""
    paddle.enable_static()
    try:
        with pir_ir(paddle):
            yield
    finally:
        paddle.disable_static()


class Built:
    """A program, its startup program, its own scope, and named outputs."""

    def __init__(self, program, startup, scope, **outputs):
        self.program, self.startup, self.scope, self.out = program, startup, scope, outputs

    def init(self, exe, seed: int = 0):
        self.program.random_seed = seed
        self.startup.random_seed = seed
        with paddle.static.scope_guard(self.scope):
            exe.run(self.startup)
        return self

    def run(self, exe, feed, fetch):
        with paddle.static.scope_guard(self.scope):
            return exe.run(self.program, feed=feed, fetch_list=fetch)

    def tensor(self, name) -> np.ndarray:
        return np.array(self.scope.find_var(name).get_tensor())


def build(fn, *args, **kwargs) -> Built:
    """Run ``fn`` (which returns a dict of output variables) under a fresh program, startup, scope and names."""
    program, startup = paddle.static.Program(), paddle.static.Program()
    with paddle.utils.unique_name.guard(), paddle.static.program_guard(program, startup):
        outputs = fn(*args, **kwargs)
    return Built(program, startup, paddle.static.Scope(), **outputs)


def conv_teacher(input_name="img"):
    """conv(4) -> batch_norm -> relu -> conv(8) -> dropout -> pool -> fc(10): for_test matters (bn, dropout)."""
    img = paddle.static.data(name=input_name, shape=[None, 1, 8, 8], dtype="float32")
    c1 = paddle.static.nn.conv2d(img, 4, 3, padding=1, name="t_c1")
    bn = paddle.nn.functional.relu(paddle.static.nn.batch_norm(c1))
    c2 = paddle.static.nn.conv2d(bn, 8, 3, padding=1, name="t_c2")
    dropped = paddle.nn.functional.dropout(c2, p=0.5)
    pooled = paddle.nn.functional.adaptive_avg_pool2d(dropped, 1)
    logits = paddle.static.nn.fc(paddle.flatten(pooled, 1), 10, name="t_fc")
    return {"c1": c1, "c2": c2, "logits": logits}


def conv_student(input_name="img"):
    """conv(4) -> relu -> conv(8) -> pool -> fc(10), names s_c1/s_c2/s_fc; same feature shapes as conv_teacher."""
    img = paddle.static.data(name=input_name, shape=[None, 1, 8, 8], dtype="float32")
    c1 = paddle.static.nn.conv2d(img, 4, 3, padding=1, name="s_c1")
    c2 = paddle.static.nn.conv2d(paddle.nn.functional.relu(c1), 8, 3, padding=1, name="s_c2")
    pooled = paddle.nn.functional.adaptive_avg_pool2d(c2, 1)
    logits = paddle.static.nn.fc(paddle.flatten(pooled, 1), 10, name="s_fc")
    return {"c1": c1, "c2": c2, "logits": logits}


def control_flow_teacher(input_name="y"):
    """fc -> cond (mean > 0: *2, else: -1) -> while_loop (3 x tanh * 1.5): a teacher with three sub-blocks."""
    y = paddle.static.data(name=input_name, shape=[None, 4], dtype="float32")
    hidden = paddle.static.nn.fc(y, 4, name="t_fc")
    branched = paddle.static.nn.cond(paddle.mean(hidden) > 0, lambda: hidden * 2.0, lambda: hidden - 1.0)
    counter = paddle.full([1], 0, "int64")
    _, looped = paddle.static.nn.while_loop(lambda i, a: i < 3, lambda i, a: (i + 1, paddle.tanh(a) * 1.5),
                                            [counter, branched])
    return {"hidden": hidden, "branched": branched, "looped": looped}


def legacy_control_flow_builds() -> bool:
    """Whether this paddle builds ``cond`` in legacy static mode (paddle 3.3 does not: its logical_not is PIR-only)."""
    try:
        with keep_mode(paddle), legacy_ir(paddle):
            paddle.enable_static()
            build(control_flow_teacher, "y")
    except TypeError as exc:
        if "must be Value" in str(exc):
            return False
        raise
    return True


def fc_student(input_name="x"):
    x = paddle.static.data(name=input_name, shape=[None, 4], dtype="float32")
    return {"out": paddle.static.nn.fc(x, 4, name="s_fc")}


def plain_fc(input_name="x"):
    """fc(3) with generated names (fc_0.w_0, fc_0.b_0): a teacher and a student built by it share the names."""
    x = paddle.static.data(name=input_name, shape=[None, 4], dtype="float32")
    return {"out": paddle.static.nn.fc(x, 3)}
