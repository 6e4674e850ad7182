"""dist.functional.kl_div_loss (KL(teacher || student) * T^2) against NumPy, in dygraph, to_static and static
programs (PIR and legacy); LegacyOpError for custom losses that use ops paddle 3's legacy mode lacks."""
import numpy as np
import paddle
import pytest

from distill_base.paddle_compat import paddle_major
from distill_reader import dist
from distill_reader.inprocess import functional as DF
from tests.dist_support import pir_static_mode, static_mode

PLACE = paddle.CPUPlace()
RNG = np.random.RandomState(7)
S = RNG.randn(6, 5).astype("float32") * 3
T = RNG.randn(6, 5).astype("float32") * 3


def np_log_softmax(a):
    a = a.astype(np.float64)
    shifted = a - a.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def np_kl_rows(s, t, temp=1.0):
    log_p, log_q = np_log_softmax(t / temp), np_log_softmax(s / temp)
    return temp * temp * np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)


def np_kl(s, t, temp=1.0, reduction="batchmean"):
    rows = np_kl_rows(s, t, temp)
    return {"batchmean": rows.mean(), "sum": rows.sum(), "none": rows}[reduction]


def np_softmax(a):
    return np.exp(np_log_softmax(a))


@pytest.fixture(autouse=True)
def _dygraph_by_default():
    paddle.disable_static()
    yield
    paddle.disable_static()


@pytest.mark.parametrize("temp", [1.0, 4.0])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_dygraph_value_equals_numpy_and_grad_reaches_the_student_only(temp, reduction):
    student = paddle.to_tensor(S, stop_gradient=False)
    teacher = paddle.to_tensor(T, stop_gradient=False)
    value = DF.kl_div_loss(student, teacher, temperature=temp, reduction=reduction)
    np.testing.assert_allclose(value.numpy(), np_kl(S, T, temp, reduction), rtol=1e-5, atol=1e-6)
    (value if reduction != "none" else paddle.mean(value)).backward()
    assert teacher.grad is None
    scale = {"batchmean": 1 / S.shape[0], "sum": 1.0, "none": 1 / S.shape[0]}[reduction]
    expected = temp * (np_softmax(S / temp) - np_softmax(T / temp)) * scale  # d/ds of T^2 KL
    np.testing.assert_allclose(student.grad.numpy(), expected, rtol=1e-4, atol=1e-6)


def test_zero_at_equality_unlike_the_cross_entropy():
    student = paddle.to_tensor(S, stop_gradient=False)
    for temp in (1.0, 2.0, 10.0):
        assert float(DF.kl_div_loss(student, S.copy(), temperature=temp)) == 0.0  # NumPy teacher accepted
    cross_entropy = float(DF.soft_label_loss(S, paddle.to_tensor(S)))
    entropy = -np.mean(np.sum(np_softmax(S) * np_log_softmax(S), axis=-1))
    np.testing.assert_allclose(cross_entropy, entropy, rtol=1e-5)  # soft_label_loss = KL + H(teacher)
    assert cross_entropy > 0.1


def test_exact_for_large_logit_gaps():
    teacher = np.array([[10.0, 0.0, 0.0]], "float32")
    student = paddle.to_tensor(np.array([[0.0, 100.0, 0.0]], "float32"), stop_gradient=False)
    expected = np_kl(student.numpy(), teacher)
    assert expected > 99.0
    value = DF.kl_div_loss(student, teacher)
    np.testing.assert_allclose(float(value), expected, rtol=1e-6)
    value.backward()
    np.testing.assert_allclose(student.grad.numpy(), np_softmax(student.numpy()) - np_softmax(teacher), atol=1e-6)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="temperature"):
        DF.kl_div_loss(paddle.zeros([2, 3]), np.zeros((2, 3), "float32"), temperature=0)
    with pytest.raises(ValueError, match="reduction.*'mean'"):
        DF.kl_div_loss(paddle.zeros([2, 3]), np.zeros((2, 3), "float32"), reduction="mean")
    with pytest.raises(dist.ShapeMismatchError, match=r"kl_div_loss.*\[2, 4\].*\[2, 3\]"):
        DF.kl_div_loss(paddle.zeros([2, 3]), np.zeros((2, 4), "float32"))


def test_to_static_student_step_equals_dygraph():
    paddle.seed(3)
    layer = paddle.nn.Linear(5, 5)

    def step(x, t):
        return DF.kl_div_loss(layer(x), t, temperature=2.0)

    eager = float(step(paddle.to_tensor(S), paddle.to_tensor(T)))
    compiled = paddle.jit.to_static(step)
    value = compiled(paddle.to_tensor(S), paddle.to_tensor(T))
    np.testing.assert_allclose(float(value), eager, rtol=1e-5)
    value.backward()
    assert layer.weight.grad is not None and float(layer.weight.grad.abs().max()) > 0


def _run_static(build_loss):
    program, startup = paddle.static.Program(), paddle.static.Program()
    with paddle.static.program_guard(program, startup):
        s = paddle.static.data("s", [None, 5], "float32")
        t = paddle.static.data("t", [None, 5], "float32")
        losses = build_loss(s, t)
    return paddle.static.Executor(PLACE).run(program, feed={"s": S, "t": T}, fetch_list=losses)


def _check_static(got):
    np.testing.assert_allclose(got[0], np_kl(S, T, 3.0), rtol=1e-5)
    np.testing.assert_allclose(got[1], np_kl(S, T, 1.0, "sum"), rtol=1e-5)
    np.testing.assert_allclose(got[2], np_kl(S, T, 2.0, "none"), rtol=1e-5, atol=1e-6)


def test_legacy_static_program_equals_numpy():
    with static_mode():
        got = _run_static(lambda s, t: [DF.kl_div_loss(s, t, 3.0), DF.kl_div_loss(s, t, reduction="sum"),
                                        DF.kl_div_loss(s, t, 2.0, "none")])
    _check_static(got)


def test_name_addressed_kl_div_loss_on_a_legacy_program():
    with static_mode():
        program = paddle.static.Program()
        with paddle.static.program_guard(program):
            paddle.static.data("s", [None, 5], "float32")
            paddle.static.data("t", [None, 5], "float32")
            value = dist.kl_div_loss("s", "t", program, temperature=3.0)
            with pytest.raises(dist.VarNotFoundError, match="'tt'"):
                dist.kl_div_loss("s", "tt", program)
        got = paddle.static.Executor(PLACE).run(program, feed={"s": S, "t": T}, fetch_list=[value])[0]
    np.testing.assert_allclose(got, np_kl(S, T, 3.0), rtol=1e-5)


def test_pir_static_program_equals_numpy():
    if paddle_major(paddle) < 3:
        pytest.skip(f"paddle {paddle.__version__} has no PIR programs (they came with paddle 3)")
    with pir_static_mode():
        got = _run_static(lambda s, t: [DF.kl_div_loss(s, t, 3.0), DF.kl_div_loss(s, t, reduction="sum"),
                                        DF.kl_div_loss(s, t, 2.0, "none")])
    _check_static(got)


@pytest.mark.parametrize("op", ["abs", "exp", "log", "sum"])
def test_custom_loss_with_an_op_legacy_mode_lacks_names_the_op(op):
    fn = getattr(paddle, op)
    with static_mode():
        program = paddle.static.Program()
        with paddle.static.program_guard(program):
            paddle.static.data("s", [None, 5], "float32")
            paddle.static.data("t", [None, 5], "float32")
            if paddle_major(paddle) < 3:  # paddle 2.6 runs every op on legacy variables: the loss builds
                assert dist.loss(lambda t, s: paddle.mean(fn(s - t)), program, t="t", s="s") is not None
                return
            with pytest.raises(dist.LegacyOpError, match=rf"dist.loss: paddle.{op} .*legacy.*einsum") as info:
                dist.loss(lambda t, s: paddle.mean(fn(s - t)), program, t="t", s="s")
            assert info.value.op == op
            s_var = program.global_block().var("s")
            with pytest.raises(dist.LegacyOpError, match=rf"dist.functional.loss: paddle.{op} "):
                DF.loss(lambda t, s: fn(s - t), teacher_args=("t",), t=program.global_block().var("t"), s=s_var)


def test_other_type_errors_in_custom_losses_pass_through():
    def broken(t, s):
        raise TypeError("my own bug")

    with pytest.raises(TypeError, match="my own bug") as info:
        DF.loss(broken, teacher_args=("t",), t=paddle.zeros([1]), s=paddle.zeros([1]))
    assert not isinstance(info.value, dist.LegacyOpError)
