"""dist.merge on real programs: the merged teacher computes what the teacher alone computes, and never trains."""
import logging

import numpy as np
import paddle
import pytest

from distill_base.paddle_compat import paddle_major
from distill_reader import dist
from tests.dist_support import (
    Built,
    build,
    control_flow_teacher,
    conv_student,
    conv_teacher,
    fc_student,
    legacy_control_flow_builds,
    pir_static_mode,
    plain_fc,
    static_mode,
)

PLACE = paddle.CPUPlace()


@pytest.fixture
def exe():
    with static_mode():
        yield paddle.static.Executor(PLACE)


def _batch(shape, seed=1):
    return np.random.RandomState(seed).randn(*shape).astype("float32")


def test_merged_conv_teacher_equals_standalone_teacher(exe):
    teacher = build(conv_teacher, "image").init(exe, seed=3)
    student = build(conv_student, "img").init(exe, seed=4)
    batch = _batch((5, 1, 8, 8))
    test_program = teacher.program.clone(for_test=True)  # batch_norm on moving stats, dropout off
    with paddle.static.scope_guard(teacher.scope):
        expected = exe.run(test_program, feed={"image": batch},
                           fetch_list=[teacher.out["c2"], teacher.out["logits"]])

    names = dist.merge(teacher.program, student.program, {"image": "img"}, PLACE, scope=student.scope,
                       teacher_scope=teacher.scope)

    assert names["image"] == "img" and names["t_c1.w_0"] == "teacher_t_c1.w_0"
    merged = student.run(exe, {"img": batch}, [names[teacher.out["c2"].name], names[teacher.out["logits"].name]])
    np.testing.assert_array_equal(merged[0], expected[0])
    np.testing.assert_allclose(merged[1], expected[1], rtol=0, atol=1e-6)
    # Twice: dropout stays off (the teacher was cloned for test).
    again = student.run(exe, {"img": batch}, [names[teacher.out["logits"].name]])
    np.testing.assert_array_equal(again[0], merged[1])
    # Teacher variables: prefixed, stop_gradient, not Parameters; the student's Parameters are untouched.
    block = student.program.global_block()
    teacher_vars = [v for v in block.vars.values() if v.name.startswith("teacher_")]
    assert teacher_vars and all(v.stop_gradient for v in teacher_vars)
    params = {p.name for p in student.program.all_parameters()}
    assert params and all(name.startswith("s_") for name in params)
    np.testing.assert_array_equal(student.tensor("teacher_t_c1.w_0"), teacher.tensor("t_c1.w_0"))


@pytest.mark.parametrize("sign", [1.0, -1.0])  # both branches of the teacher's cond
def test_teacher_with_cond_and_while_loop_merges_and_computes(exe, sign):
    if not legacy_control_flow_builds():
        pytest.skip(f"paddle {paddle.__version__} cannot build paddle.static.nn.cond in legacy static mode (its "
                    "logical_not calls the PIR-only C++ API), so no legacy teacher with sub-blocks can be made; "
                    "the dygraph route's counterpart runs: test_dist_teacher.py::"
                    "test_teacher_with_cond_and_while_loop_through_the_dygraph_route")
    teacher = build(control_flow_teacher, "y").init(exe, seed=5)
    student = build(fc_student, "x").init(exe, seed=6)
    # Make the fc's output mean positive or negative so both cond branches run.
    with paddle.static.scope_guard(teacher.scope):
        teacher.scope.find_var("t_fc.b_0").get_tensor().set(np.full([4], 3.0 * sign, "float32"), PLACE)
    batch = _batch((3, 4), seed=2) * 0.1
    expected = teacher.run(exe, {"y": batch}, [teacher.out["branched"], teacher.out["looped"]])

    names = dist.merge(teacher.program, student.program, {"y": "x"}, PLACE, scope=student.scope,
                       teacher_scope=teacher.scope)

    assert len(student.program.blocks) == len(teacher.program.blocks) == 4
    for op in student.program.global_block().ops:
        if op.has_attr("sub_block"):
            sub = op._block_attr("sub_block")
            assert sub.program is student.program and sub.idx >= 1 and sub.parent_idx == 0
    got = student.run(exe, {"x": batch}, [names[teacher.out["branched"].name], names[teacher.out["looped"].name]])
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])
    # The NumPy computation of the same teacher.
    w, b = teacher.tensor("t_fc.w_0"), teacher.tensor("t_fc.b_0")
    hidden = batch @ w + b
    looped = hidden * 2.0 if hidden.mean() > 0 else hidden - 1.0
    for _ in range(3):
        looped = np.tanh(looped) * 1.5
    np.testing.assert_allclose(got[1], looped, rtol=1e-5, atol=1e-6)


def test_teacher_loaded_from_inference_model_merges(exe, tmp_path):
    teacher = build(conv_teacher, "image").init(exe, seed=7)
    prefix = str(tmp_path / "teacher")
    with paddle.static.scope_guard(teacher.scope):
        paddle.static.save_inference_model(prefix, [teacher.program.global_block().var("image")],
                                           [teacher.out["logits"]], exe, program=teacher.program)
    loaded_scope = paddle.static.Scope()
    with paddle.static.scope_guard(loaded_scope):
        program, feed_names, fetch_vars = paddle.static.load_inference_model(prefix, exe)
        batch = _batch((4, 1, 8, 8), seed=8)
        expected = exe.run(program, feed={feed_names[0]: batch}, fetch_list=fetch_vars)[0]
    student = build(conv_student, "img").init(exe)

    names = dist.merge(program, student.program, {feed_names[0]: "img"}, PLACE, scope=student.scope,
                       teacher_scope=loaded_scope)

    assert not {op.type for op in student.program.global_block().ops} & {"feed", "fetch"}
    got = student.run(exe, {"img": batch}, [names[fetch_vars[0].name]])[0]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def test_training_the_student_lowers_the_loss_and_leaves_the_teacher_bit_identical(exe):
    teacher = build(conv_teacher, "img").init(exe, seed=9)
    student = build(conv_student, "img").init(exe, seed=10)
    dist.merge(teacher.program, student.program, {"img": "img"}, PLACE, scope=student.scope,
               teacher_scope=teacher.scope)
    teacher_names = sorted(v.name for v in student.program.list_vars()
                           if v.persistable and v.name.startswith("teacher_"))
    before = {name: student.tensor(name).copy() for name in teacher_names}
    with paddle.utils.unique_name.guard("distill_"), paddle.static.program_guard(student.program, student.startup):
        distill = dist.l2_loss("teacher_t_fc.tmp_1", "s_fc.tmp_1", student.program)
        fsp = dist.fsp_loss("teacher_t_c1.tmp_1", "teacher_t_c2.tmp_1", "s_c1.tmp_1", "s_c2.tmp_1", student.program)
        total = distill + fsp
        paddle.optimizer.Adam(learning_rate=0.01).minimize(total)
    with paddle.static.scope_guard(student.scope):
        exe.run(student.startup)  # initializes the optimizer's accumulators (and re-initializes the student)

    grad_names = {v.name for v in student.program.list_vars() if v.name.endswith("@GRAD")}
    assert {"s_fc.w_0@GRAD", "s_c1.w_0@GRAD"} <= grad_names
    assert not [g for g in grad_names if g.startswith("teacher_")]
    batch = _batch((8, 1, 8, 8), seed=11)
    losses = []
    for _ in range(6):
        loss_value, grad = student.run(exe, {"img": batch}, [total, "s_fc.w_0@GRAD"])
        losses.append(float(loss_value))
        assert np.abs(grad).sum() > 0
    assert losses[-1] < losses[0] * 0.9, losses
    for name in teacher_names:
        assert np.array_equal(student.tensor(name), before[name]), name


def test_data_name_map_errors_name_the_problem(exe):
    teacher = build(conv_teacher, "image").init(exe)
    student = build(conv_student, "img")
    with pytest.raises(dist.MergeError, match=r"key 'imag'.*closest names: 'image'"):
        dist.merge(teacher.program, student.program, {"imag": "img"}, PLACE, scope=student.scope,
                   teacher_scope=teacher.scope)
    with pytest.raises(dist.MergeError, match=r"value 'im' .*closest names: 'img'"):
        dist.merge(teacher.program, student.program, {"image": "im"}, PLACE, scope=student.scope,
                   teacher_scope=teacher.scope)
    wide = build(fc_student, "x")
    with pytest.raises(dist.ShapeMismatchError, match=r"\[-1, 1, 8, 8\].*\[-1, 4\]"):
        dist.merge(teacher.program, wide.program, {"image": "x"}, PLACE, scope=wide.scope,
                   teacher_scope=teacher.scope)
    assert not [v for v in student.program.list_vars() if v.name.startswith("teacher_")]  # nothing half-merged


def test_prefix_collision_is_an_error(exe):
    teacher = build(conv_teacher, "img").init(exe)
    student = build(conv_student, "img")
    dist.merge(teacher.program, student.program, {"img": "img"}, PLACE, scope=student.scope,
               teacher_scope=teacher.scope)
    with pytest.raises(dist.MergeError, match=r"clash with student variables \[.teacher_batch_norm_0.b_0"):
        dist.merge(teacher.program, student.program, {"img": "img"}, PLACE, scope=student.scope,
                   teacher_scope=teacher.scope)


def test_uninitialized_teacher_is_reported(exe, caplog):
    teacher = build(fc_student, "x")  # never initialized
    student = build(fc_student, "x")
    with caplog.at_level(logging.WARNING, logger="distill_reader.inprocess.program_merge"):
        dist.merge(teacher.program, student.program, {"x": "x"}, PLACE, scope=student.scope,
                   teacher_scope=teacher.scope)
    assert "not initialized" in caplog.text and "s_fc.w_0" in caplog.text


def test_same_generated_names_in_one_scope_need_the_teacher_scope(exe):
    """Teacher and student both named fc_0.w_0, in one scope, student initialized last: never mix them."""
    shared = paddle.static.Scope()
    teacher, student = build(plain_fc, "x"), build(plain_fc, "x")
    teacher.scope = student.scope = shared
    teacher.init(exe, seed=1)
    alone = Built(teacher.program, teacher.startup, paddle.static.Scope()).init(exe, seed=1)  # the teacher's state
    student.init(exe, seed=2)  # overwrites fc_0.w_0 / fc_0.b_0 in the shared scope with the student's
    batch = _batch((3, 4), seed=4)
    expected = alone.run(exe, {"x": batch}, [teacher.out["out"]])[0]
    assert not np.allclose(expected, student.run(exe, {"x": batch}, [student.out["out"]])[0])

    with pytest.raises(dist.MergeError, match=r"teacher variable 'fc_0\.[wb]_0'.*teacher_scope"):
        dist.merge(teacher.program, student.program, {"x": "x"}, PLACE, scope=shared)
    assert not [v for v in student.program.list_vars() if v.name.startswith("teacher_")]  # nothing half-merged

    names = dist.merge(teacher.program, student.program, {"x": "x"}, PLACE, scope=shared, teacher_scope=alone.scope)
    merged = student.run(exe, {"x": batch}, [names[teacher.out["out"].name]])[0]
    np.testing.assert_allclose(merged, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("bad", ["shape", "dtype"])
def test_teacher_tensors_must_match_the_declared_variables(exe, bad):
    teacher = build(fc_student, "x").init(exe, seed=7)
    student = build(conv_student, "img").init(exe, seed=8)
    wrong = np.zeros([5, 4], "float32") if bad == "shape" else np.zeros([4, 4], "float64")
    teacher.scope.find_var("s_fc.w_0").get_tensor().set(wrong, PLACE)
    with pytest.raises(dist.MergeError, match=r"teacher variable 's_fc\.w_0'.*declares float32 \[4, 4\]"):
        dist.merge(teacher.program, student.program, {}, PLACE, scope=student.scope, teacher_scope=teacher.scope)
    assert not [v for v in student.program.list_vars() if v.name.startswith("teacher_")]
    assert student.scope.find_var("teacher_s_fc.b_0") is None  # no tensor copied either


def test_pir_programs_get_a_clear_error_naming_the_flag():
    if paddle_major(paddle) < 3:
        pytest.skip(f"paddle {paddle.__version__} has no PIR programs (they came with paddle 3)")
    with pir_static_mode():
        teacher, student = build(plain_fc, "x"), build(plain_fc, "x")
        with pytest.raises(dist.PirProgramError, match="teacher_program is a paddle 3 PIR program.*"
                                                       "FLAGS_enable_pir_api=0 before paddle is imported"):
            dist.merge(teacher.program, student.program, {"x": "x"}, PLACE, scope=student.scope)
        with pytest.raises(dist.PirProgramError, match="dist.l2_loss: program is a paddle 3 PIR program"):
            dist.l2_loss("a", "b", student.program)
