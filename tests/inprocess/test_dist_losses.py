"""Distillation losses against NumPy references, in static programs and in dygraph; errors; student checkpoints."""
import os

import numpy as np
import paddle
import pytest

from distill_base.paddle_compat import paddle_major
from distill_reader import dist
from distill_reader.inprocess import functional as DF
from tests.dist_support import build, conv_student, conv_teacher, pir_static_mode, static_mode

PLACE = paddle.CPUPlace()
RNG = np.random.RandomState(123)


# --- NumPy references (float64) ---------------------------------------------------------------------------------
def np_l2(t, s):
    return np.mean((s.astype(np.float64) - t) ** 2)


def np_fsp_matrix(a, b):
    n, c1, h, w = a.shape
    return np.einsum("nip,njp->nij", a.reshape(n, c1, -1).astype(np.float64), b.reshape(n, b.shape[1], -1)) / (h * w)


def np_fsp(t1, t2, s1, s2):
    return np.mean((np_fsp_matrix(s1, s2) - np_fsp_matrix(t1, t2)) ** 2)


def np_softmax(a):
    e = np.exp(a - a.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def np_soft_label(t, s, tt=1.0, st=1.0):
    t, s = t.astype(np.float64), s.astype(np.float64)
    return np.mean(-np.sum(np_softmax(t / tt) * np.log(np_softmax(s / st)), axis=-1))


# --- static ------------------------------------------------------------------------------------------------------
@pytest.fixture
def merged():
    """Teacher (conv + bn + fc) merged into the student; both initialized; returns (exe, student Built, batch)."""
    with static_mode():
        exe = paddle.static.Executor(PLACE)
        teacher = build(conv_teacher, "img").init(exe, seed=1)
        student = build(conv_student, "img").init(exe, seed=2)
        dist.merge(teacher.program, student.program, {"img": "img"}, PLACE, scope=student.scope,
                   teacher_scope=teacher.scope)
        yield exe, student, RNG.randn(6, 1, 8, 8).astype("float32")


def _losses(student, build_losses):
    with paddle.utils.unique_name.guard("distill_"), paddle.static.program_guard(student.program, student.startup):
        return build_losses()


def test_static_losses_equal_numpy(merged):
    exe, student, batch = merged
    p = student.program
    losses = _losses(student, lambda: [
        dist.l2_loss("teacher_t_fc.tmp_1", "s_fc.tmp_1", p),
        dist.soft_label_loss("teacher_t_fc.tmp_1", "s_fc.tmp_1", p),
        dist.soft_label_loss("teacher_t_fc.tmp_1", "s_fc.tmp_1", p, teacher_temperature=4.0, student_temperature=2.0),
        dist.fsp_loss("teacher_t_c1.tmp_1", "teacher_t_c2.tmp_1", "s_c1.tmp_1", "s_c2.tmp_1", p),
        # (max, not abs: paddle 3.3's legacy static mode has no abs/exp/log/sum/multiply for legacy Variables)
        dist.loss(lambda t, s, w: paddle.max(paddle.square(paddle.subtract(s, t))) * w, p,
                  t="teacher_t_fc.tmp_1", s="s_fc.tmp_1", w=3.0),
    ])
    fetched = student.run(exe, {"img": batch}, losses + [
        "teacher_t_fc.tmp_1", "s_fc.tmp_1", "teacher_t_c1.tmp_1", "teacher_t_c2.tmp_1", "s_c1.tmp_1", "s_c2.tmp_1"])
    l2, soft1, soft42, fsp, custom, t_fc, s_fc, t1, t2, s1, s2 = fetched
    assert np.abs(t_fc - s_fc).max() > 1e-3  # the teacher and the student really differ
    np.testing.assert_allclose(l2, np_l2(t_fc, s_fc), rtol=1e-5)
    np.testing.assert_allclose(soft1, np_soft_label(t_fc, s_fc), rtol=1e-5)
    np.testing.assert_allclose(soft42, np_soft_label(t_fc, s_fc, 4.0, 2.0), rtol=1e-5)
    np.testing.assert_allclose(fsp, np_fsp(t1, t2, s1, s2), rtol=1e-5)
    np.testing.assert_allclose(custom, 3.0 * np.max((s_fc.astype(np.float64) - t_fc) ** 2), rtol=1e-5)
    assert l2.shape == () and fsp.shape == ()


def test_static_loss_default_program_is_the_default_main_program(merged):
    exe, student, batch = merged
    with paddle.utils.unique_name.guard("distill_"), paddle.static.program_guard(student.program, student.startup):
        l2 = dist.l2_loss("teacher_t_fc.tmp_1", "s_fc.tmp_1")  # program=None
    value, t_fc, s_fc = student.run(exe, {"img": batch}, [l2, "teacher_t_fc.tmp_1", "s_fc.tmp_1"])
    np.testing.assert_allclose(value, np_l2(t_fc, s_fc), rtol=1e-5)


def test_unknown_names_list_the_closest_names(merged):
    _, student, _ = merged
    p = student.program
    with pytest.raises(dist.VarNotFoundError, match=r"'t_fc.tmp_1' not found.*closest names: 'teacher_t_fc.tmp_1'"):
        dist.l2_loss("t_fc.tmp_1", "s_fc.tmp_1", p)  # forgot the prefix
    with pytest.raises(dist.VarNotFoundError, match=r"'s_fc.tmp_2'.*closest names: .*'s_fc.tmp_1'") as info:
        dist.soft_label_loss("teacher_t_fc.tmp_1", "s_fc.tmp_2", p)
    assert "s_fc.tmp_1" in info.value.suggestions
    with pytest.raises(dist.VarNotFoundError, match=r"argument 's_var'"):
        dist.loss(lambda t_var, s_var: t_var, p, t_var="teacher_t_fc.tmp_1", s_var="nope")
    with pytest.raises(dist.VarNotFoundError, match="teacher var2"):
        dist.fsp_loss("teacher_t_c1.tmp_1", "teacher_t_c9.tmp_1", "s_c1.tmp_1", "s_c2.tmp_1", p)


def test_shape_mismatches_name_both_shapes(merged):
    _, student, _ = merged
    p = student.program
    with pytest.raises(dist.ShapeMismatchError, match=r"'teacher_t_fc.tmp_1' has shape \[-1, 10\].*"
                                                      r"'s_c2.tmp_1' has shape \[-1, 8, 8, 8\]"):
        dist.l2_loss("teacher_t_fc.tmp_1", "s_c2.tmp_1", p)
    with pytest.raises(dist.ShapeMismatchError, match=r"soft_label_loss.*\[-1, 4, 8, 8\].*\[-1, 10\]"):
        dist.soft_label_loss("teacher_t_c1.tmp_1", "s_fc.tmp_1", p)
    # fsp: teacher var1 has 4 channels, student var1 has 8.
    with pytest.raises(dist.ShapeMismatchError, match=r"fsp_loss: teacher 'teacher_t_c1.tmp_1' has shape "
                                                      r"\[-1, 4, 8, 8\] but student 's_c2.tmp_1' has shape"):
        dist.fsp_loss("teacher_t_c1.tmp_1", "teacher_t_c2.tmp_1", "s_c2.tmp_1", "s_c1.tmp_1", p)
    with pytest.raises(dist.ShapeMismatchError, match=r"fsp_loss: student 's_fc.tmp_1' has shape \[-1, 10\]"):
        dist.fsp_loss("teacher_t_c1.tmp_1", "teacher_t_c2.tmp_1", "s_fc.tmp_1", "s_c2.tmp_1", p)


def test_student_checkpoint_holds_no_teacher_variables(merged, tmp_path):
    exe, student, batch = merged
    expected = {p.name: student.tensor(p.name).copy() for p in student.program.all_parameters()}
    saved = dist.save_student_params(exe, str(tmp_path / "each"), student.program, scope=student.scope)
    assert sorted(saved) == sorted(expected) and len(saved) == 6  # s_c1, s_c2, s_fc: weight and bias
    # The merged program does hold teacher persistables (a save_persistables would write them) ...
    assert len([v for v in student.program.list_vars() if v.persistable and v.name.startswith("teacher_")]) >= 10
    assert sorted(os.listdir(tmp_path / "each")) == sorted(expected)
    assert not [n for n in saved if n.startswith("teacher_") or n.startswith("t_")]  # ... the helper does not

    dist.save_student_params(exe, tmp_path / "one", student.program, filename="student.pdiparams",
                             scope=student.scope)
    # Load into a student-only program in a fresh scope: the file holds exactly the student's tensors.
    fresh = build(conv_student, "img")
    loaded = dist.load_student_params(exe, tmp_path / "one", fresh.program, filename="student.pdiparams",
                                      scope=fresh.scope)
    assert sorted(loaded) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(fresh.tensor(name), value)
    logits = fresh.run(exe, {"img": batch}, ["s_fc.tmp_1"])[0]
    np.testing.assert_array_equal(logits, student.run(exe, {"img": batch}, ["s_fc.tmp_1"])[0])
    size = os.path.getsize(tmp_path / "one" / "student.pdiparams")
    assert size < sum(v.nbytes for v in expected.values()) + 200 * len(expected)  # no room for teacher tensors


# --- dygraph -------------------------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _dygraph_by_default():
    paddle.disable_static()  # whatever an earlier test file left behind; static tests switch via static_mode()
    yield


def test_functional_losses_equal_numpy_and_grad_reaches_the_student_only():
    t = RNG.randn(5, 7).astype("float32")
    s = RNG.randn(5, 7).astype("float32")
    t1, t2 = RNG.randn(3, 4, 5, 5).astype("float32"), RNG.randn(3, 6, 5, 5).astype("float32")
    s1, s2 = RNG.randn(3, 4, 2, 3).astype("float32"), RNG.randn(3, 6, 2, 3).astype("float32")

    teacher = paddle.to_tensor(t, stop_gradient=False)
    student = paddle.to_tensor(s, stop_gradient=False)
    l2 = DF.l2_loss(teacher, student)
    np.testing.assert_allclose(l2.numpy(), np_l2(t, s), rtol=1e-5)
    l2.backward()
    assert teacher.grad is None
    np.testing.assert_allclose(student.grad.numpy(), 2 * (s - t) / s.size, rtol=1e-5, atol=1e-7)

    for tt, st in ((1.0, 1.0), (3.0, 2.0)):
        student = paddle.to_tensor(s, stop_gradient=False)
        soft = DF.soft_label_loss(t, student, teacher_temperature=tt, student_temperature=st)  # NumPy teacher
        np.testing.assert_allclose(soft.numpy(), np_soft_label(t, s, tt, st), rtol=1e-5)
        soft.backward()
        expected_grad = (np_softmax(s / st) - np_softmax(t / tt)) / st / s.shape[0]
        np.testing.assert_allclose(student.grad.numpy(), expected_grad, rtol=1e-4, atol=1e-7)

    teacher_maps = [paddle.to_tensor(a, stop_gradient=False) for a in (t1, t2)]
    student_maps = [paddle.to_tensor(a, stop_gradient=False) for a in (s1, s2)]
    fsp = DF.fsp_loss(*teacher_maps, *student_maps)
    np.testing.assert_allclose(fsp.numpy(), np_fsp(t1, t2, s1, s2), rtol=1e-5)
    fsp.backward()
    assert all(m.grad is None for m in teacher_maps)
    assert all(m.grad is not None and float(m.grad.abs().sum()) > 0 for m in student_maps)

    teacher = paddle.to_tensor(t, stop_gradient=False)
    student = paddle.to_tensor(s, stop_gradient=False)
    custom = DF.loss(lambda a, b: paddle.mean(paddle.abs(b - a)), teacher_args=("a",), a=teacher, b=student)
    np.testing.assert_allclose(custom.numpy(), np.mean(np.abs(s - t)), rtol=1e-5)
    custom.backward()
    assert teacher.grad is None and student.grad is not None


def test_functional_errors():
    with pytest.raises(dist.ShapeMismatchError, match=r"\[4, 10\].*\[4, 5\]"):
        DF.l2_loss(np.zeros((4, 10), "float32"), paddle.zeros([4, 5]))
    with pytest.raises(dist.ShapeMismatchError, match="channel"):
        DF.fsp_loss(paddle.zeros([2, 3, 4, 4]), paddle.zeros([2, 5, 4, 4]),
                    paddle.zeros([2, 4, 4, 4]), paddle.zeros([2, 5, 4, 4]))
    with pytest.raises(ValueError, match="teacher_args"):
        DF.loss(lambda a: a, teacher_args=("t",), a=paddle.zeros([1]))


def test_dygraph_training_lowers_the_loss_and_keeps_the_teacher():
    paddle.seed(0)
    teacher = paddle.nn.Sequential(paddle.nn.Linear(6, 16), paddle.nn.ReLU(), paddle.nn.Linear(16, 5))
    student = paddle.nn.Linear(6, 5)
    teacher.eval()
    before = [p.numpy().copy() for p in teacher.parameters()]
    optimizer = paddle.optimizer.SGD(learning_rate=0.5, parameters=student.parameters())
    x = paddle.to_tensor(RNG.randn(32, 6).astype("float32"))
    losses = []
    for _ in range(8):
        loss = DF.soft_label_loss(teacher(x), student(x), 2.0, 2.0) + DF.l2_loss(teacher(x), student(x))
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
        losses.append(float(loss))
    assert losses[-1] < losses[0] * 0.9, losses
    for p, b in zip(teacher.parameters(), before):
        assert p.grad is None
        assert np.array_equal(p.numpy(), b)


# --- numerical stability, and the losses on paddle 3 PIR programs ------------------------------------------------
CONFIDENT_TEACHER = np.array([[10.0, 0.0, 0.0]], "float32")
WRONG_STUDENT = np.array([[0.0, 100.0, 0.0]], "float32")


def test_soft_label_loss_is_exact_for_large_logit_gaps_in_dygraph():
    paddle.disable_static()
    expected = np_soft_label(CONFIDENT_TEACHER, WRONG_STUDENT)
    assert abs(expected - 99.995) < 1e-3
    student = paddle.to_tensor(WRONG_STUDENT, stop_gradient=False)
    value = DF.soft_label_loss(CONFIDENT_TEACHER, student)
    np.testing.assert_allclose(float(value), expected, rtol=1e-6)
    value.backward()  # d/ds = softmax(s) - softmax(t): no gradient lost to clipping
    np.testing.assert_allclose(student.grad.numpy(), np_softmax(WRONG_STUDENT.astype(np.float64))
                               - np_softmax(CONFIDENT_TEACHER.astype(np.float64)), atol=1e-6)


def test_soft_label_loss_is_exact_for_large_logit_gaps_in_static_programs():
    with static_mode():
        program, startup = paddle.static.Program(), paddle.static.Program()
        with paddle.static.program_guard(program, startup):
            paddle.static.data("t", [None, 3], "float32")
            paddle.static.data("s", [None, 3], "float32")
            value = dist.soft_label_loss("t", "s", program)
        exe = paddle.static.Executor(PLACE)
        got = exe.run(program, feed={"t": CONFIDENT_TEACHER, "s": WRONG_STUDENT}, fetch_list=[value])[0]
    np.testing.assert_allclose(got, np_soft_label(CONFIDENT_TEACHER, WRONG_STUDENT), rtol=1e-6)


def test_functional_losses_build_on_pir_values():
    """Paddle 3's PIR programs: dist.functional builds every loss on Values (the name-based API cannot)."""
    if paddle_major(paddle) < 3:
        pytest.skip(f"paddle {paddle.__version__} has no PIR programs (they came with paddle 3)")
    t, s = RNG.randn(4, 10).astype("float32"), RNG.randn(4, 10).astype("float32")
    t1, t2, s1, s2 = (RNG.randn(2, c, 3, 3).astype("float32") for c in (4, 6, 4, 6))
    with pir_static_mode():
        program, startup = paddle.static.Program(), paddle.static.Program()
        with paddle.static.program_guard(program, startup):
            feeds = {name: paddle.static.data(name, list(a.shape), "float32")
                     for name, a in {"t": t, "s": s, "t1": t1, "t2": t2, "s1": s1, "s2": s2}.items()}
            losses = [DF.l2_loss(feeds["t"], feeds["s"]), DF.soft_label_loss(feeds["t"], feeds["s"], 2.0, 3.0),
                      DF.fsp_loss(feeds["t1"], feeds["t2"], feeds["s1"], feeds["s2"])]
        got = paddle.static.Executor(PLACE).run(
            program, feed={"t": t, "s": s, "t1": t1, "t2": t2, "s1": s1, "s2": s2}, fetch_list=losses)
    np.testing.assert_allclose(got[0], np_l2(t, s), rtol=1e-5)
    np.testing.assert_allclose(got[1], np_soft_label(t, s, 2.0, 3.0), rtol=1e-5)
    np.testing.assert_allclose(got[2], np_fsp(t1, t2, s1, s2), rtol=1e-5)
