"""Name-based dist losses: a teacher variable given by the student's name (teacher and student built with the same
generated names, merged with a prefix) is an error naming both; a loss never sets ``stop_gradient`` on a variable
of the student, so the student keeps learning from its hard labels."""
import numpy as np
import paddle
import pytest

from distill_reader import dist
from tests.dist_support import build, plain_fc, static_mode

PLACE = paddle.CPUPlace()


def _same_named_pair(exe):
    """A teacher and a student both built by ``plain_fc`` (fc_0.w_0, fc_0.tmp_1 in each), merged."""
    teacher = build(plain_fc, "x").init(exe, seed=1)
    student = build(plain_fc, "x").init(exe, seed=2)
    dist.merge(teacher.program, student.program, {"x": "x"}, PLACE, scope=student.scope, teacher_scope=teacher.scope)
    return teacher, student


def _out_name(student):
    name = student.out["out"].name
    assert student.program.global_block().has_var("teacher_" + name)
    return name


@pytest.mark.parametrize("api", ["l2_loss", "soft_label_loss"])
def test_student_name_for_a_teacher_variable_is_an_error_naming_both(api):
    with static_mode():
        exe = paddle.static.Executor(PLACE)
        _, student = _same_named_pair(exe)
        name = _out_name(student)
        with paddle.static.program_guard(student.program, student.startup):
            with pytest.raises(dist.TeacherNameError, match=rf"'{name}'.*'teacher_{name}'") as info:
                getattr(dist, api)(name, name, student.program)
        assert (info.value.name, info.value.teacher_name) == (name, "teacher_" + name)
        assert student.program.global_block().var(name).stop_gradient is False


def test_fsp_loss_checks_its_teacher_names():
    with static_mode():
        exe = paddle.static.Executor(PLACE)
        _, student = _same_named_pair(exe)
        name = _out_name(student)
        with pytest.raises(dist.TeacherNameError, match="teacher var2"):
            dist.fsp_loss("teacher_" + name, name, name, name, student.program)


def test_a_loss_never_freezes_a_student_variable():
    """The teacher side of a loss is a student variable (no merged twin): the loss reads it through a
    gradient-free copy; the student's own output keeps its gradient from the hard labels and its weights move."""
    def two_heads():
        x = paddle.static.data(name="x", shape=[None, 4], dtype="float32")
        y = paddle.static.data(name="y", shape=[None, 1], dtype="float32")
        a = paddle.static.nn.fc(x, 3, name="head_a")
        b = paddle.static.nn.fc(x, 3, name="head_b")
        return {"a": a, "b": b, "y": y}

    with static_mode():
        exe = paddle.static.Executor(PLACE)
        built = build(two_heads)
        a, b, y = built.out["a"], built.out["b"], built.out["y"]
        with paddle.utils.unique_name.guard("loss_"), paddle.static.program_guard(built.program, built.startup):
            distill = dist.l2_loss(a.name, b.name, built.program)
            hard = paddle.mean(paddle.square(paddle.subtract(paddle.mean(a, axis=1, keepdim=True), y)))
            paddle.optimizer.SGD(learning_rate=0.5).minimize(paddle.add(hard, distill))
        assert a.stop_gradient is False
        built.init(exe, seed=3)
        params = {p.name: built.tensor(p.name).copy() for p in built.program.all_parameters()}
        rng = np.random.RandomState(0)
        feed = {"x": rng.randn(8, 4).astype("float32"), "y": rng.randn(8, 1).astype("float32") + 3}
        built.run(exe, feed, [])
        moved = {name: not np.allclose(before, built.tensor(name)) for name, before in params.items()}
        assert all(moved.values()), moved   # head_a learns from the hard labels, head_b from the distill loss


def test_merged_pair_trains_the_student_not_the_teacher():
    with static_mode():
        exe = paddle.static.Executor(PLACE)
        teacher, student = _same_named_pair(exe)
        name = _out_name(student)
        with paddle.utils.unique_name.guard("loss_"), paddle.static.program_guard(student.program, student.startup):
            distill = dist.l2_loss("teacher_" + name, name, student.program)
            paddle.optimizer.SGD(learning_rate=0.5).minimize(distill)
        student_params = [p.name for p in student.program.all_parameters() if not p.name.startswith("teacher_")]
        teacher_before = student.tensor("teacher_fc_0.w_0").copy()
        feed = {"x": np.random.RandomState(1).randn(8, 4).astype("float32")}
        with paddle.static.scope_guard(student.scope):
            exe.run(student.startup)   # the optimizer's learning rate (re-initializes the student's weights)
        before = {n: student.tensor(n).copy() for n in student_params}
        loss_before, = student.run(exe, feed, [distill])
        assert loss_before > 1e-4
        for _ in range(20):
            student.run(exe, feed, [])
        loss_after, = student.run(exe, feed, [distill])
        assert loss_after < loss_before / 2
        assert all(not np.allclose(before[n], student.tensor(n)) for n in student_params)
        np.testing.assert_array_equal(student.tensor("teacher_fc_0.w_0"), teacher_before)


def test_dist_is_paddleslims_name_for_the_inprocess_package():
    """``distill_reader.dist`` (PaddleSlim's name) re-exports ``distill_reader.inprocess``: every public name is the
    same object, and the PaddleSlim spellings import."""
    import distill_reader
    from distill_reader import inprocess
    from distill_reader.dist import merge, soft_label_loss

    assert distill_reader.dist.__all__ == inprocess.__all__ and len(inprocess.__all__) == 21
    assert all(getattr(distill_reader.dist, name) is getattr(inprocess, name) for name in inprocess.__all__)
    assert merge is inprocess.merge and soft_label_loss is inprocess.soft_label_loss
    assert dist.functional.kl_div_loss is inprocess.functional.kl_div_loss
    # the submodule spellings of earlier releases
    from distill_reader.dist.functional import kl_div_loss
    from distill_reader.dist.merge import MergeError

    assert kl_div_loss is inprocess.functional.kl_div_loss and MergeError is inprocess.MergeError
    assert dist.merge is inprocess.merge   # the function, not the module of the same old name
