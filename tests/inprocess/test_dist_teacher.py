"""A saved teacher inside the training process: dist.load_teacher (paddle.jit.load, frozen) in a dygraph and a
paddle.jit.to_static student with the dist losses; load_teacher_program for dist.merge; the project's errors for a
PIR .json teacher in legacy mode / paddle 2.6 and for PIR programs given to the merge route."""
import os

import numpy as np
import paddle
import pytest

from distill_base.paddle_compat import legacy_ir, paddle_major, pir_enabled
from distill_reader import dist
from distill_reader.inprocess import functional as DF
from tests.dist_support import build, conv_teacher, static_mode

RNG = np.random.RandomState(11)
X = RNG.randn(16, 6).astype("float32")


def _teacher_layer():
    paddle.seed(5)
    layer = paddle.nn.Sequential(paddle.nn.Linear(6, 16), paddle.nn.BatchNorm1D(16), paddle.nn.ReLU(),
                                 paddle.nn.Dropout(0.5), paddle.nn.Linear(16, 4))
    layer.train()  # a few batches move the BatchNorm statistics away from their initial values
    for _ in range(3):
        layer(paddle.to_tensor(RNG.randn(32, 6).astype("float32") * 2 + 1))
    layer.eval()
    return layer


@pytest.fixture
def saved_teacher(tmp_path):
    """A teacher saved the default way of the running paddle (3.x: PIR .json; 2.6: .pdmodel); (prefix, outputs)."""
    paddle.disable_static()
    layer = _teacher_layer()
    expected = layer(paddle.to_tensor(X)).numpy()
    prefix = str(tmp_path / "teacher" / "inference")
    paddle.jit.save(layer, prefix, input_spec=[paddle.static.InputSpec([None, 6], "float32", "x")])
    want = ".json" if paddle_major(paddle) >= 3 else ".pdmodel"
    assert os.path.isfile(prefix + want)
    yield prefix, expected
    paddle.disable_static()


def _student():
    paddle.seed(9)
    return paddle.nn.Sequential(paddle.nn.Linear(6, 8), paddle.nn.ReLU(), paddle.nn.Linear(8, 4))


def test_loaded_teacher_is_frozen_and_equals_the_saved_layer(saved_teacher):
    prefix, expected = saved_teacher
    teacher = dist.load_teacher(prefix)
    x = paddle.to_tensor(X, stop_gradient=False)
    out = teacher(x)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-6)  # eval mode: no dropout, bn stats
    np.testing.assert_array_equal(teacher(x).numpy(), out.numpy())  # deterministic (dropout off)
    assert out.stop_gradient and all(p.stop_gradient for p in teacher.parameters())
    assert len(teacher.parameters()) >= 4
    student = _student()
    assert {str(p.place) for p in teacher.parameters()} == {str(p.place) for p in student.parameters()}


def _train(step, student, teacher, steps=15):
    optimizer = paddle.optimizer.Adam(learning_rate=0.02, parameters=student.parameters())
    before = [p.numpy().copy() for p in teacher.parameters()]
    losses = []
    for i in range(steps):
        x = paddle.to_tensor(X[(i % 2) * 8:(i % 2) * 8 + 8])
        loss = step(x)
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
        losses.append(float(loss))
    for p, b in zip(teacher.parameters(), before):
        assert p.grad is None
        np.testing.assert_array_equal(p.numpy(), b)
    return losses


def test_dygraph_student_learns_from_the_loaded_teacher(saved_teacher):
    prefix, expected = saved_teacher
    teacher, student = dist.load_teacher(prefix), _student()

    def step(x):
        s, t = student(x), teacher(x)
        return DF.kl_div_loss(s, t, temperature=2.0) + 0.1 * DF.l2_loss(t, s)

    losses = _train(step, student, teacher)
    assert losses[-1] < 0.5 * losses[0], losses
    np.testing.assert_allclose(teacher(paddle.to_tensor(X)).numpy(), expected, rtol=1e-5, atol=1e-6)


def test_to_static_student_with_the_loaded_teacher_equals_dygraph(saved_teacher):
    prefix, _ = saved_teacher
    teacher = dist.load_teacher(prefix)
    student_a, student_b = _student(), _student()

    def make_step(student):
        def step(x):
            return DF.kl_div_loss(student(x), teacher(x), temperature=2.0) + DF.soft_label_loss(teacher(x), student(x))
        return step

    eager = _train(make_step(student_a), student_a, teacher, steps=6)
    compiled = _train(paddle.jit.to_static(make_step(student_b)), student_b, teacher, steps=6)
    np.testing.assert_allclose(compiled, eager, rtol=1e-4)
    assert compiled[-1] < compiled[0]


class _ControlFlowTeacher(paddle.nn.Layer):
    """fc -> if mean > 0: x2 else: -1 -> three rounds of tanh(x) * 1.5 in a tensor-driven while loop."""

    def __init__(self):
        super().__init__()
        self.fc = paddle.nn.Linear(4, 4)

    def forward(self, y):
        hidden = self.fc(y)
        if hidden.mean() > 0:
            out = hidden * 2.0
        else:
            out = hidden - 1.0
        i = paddle.zeros([1], "int64")
        while i < 3:
            out = paddle.tanh(out) * 1.5
            i = i + 1
        return out


def test_teacher_with_cond_and_while_loop_through_the_dygraph_route(tmp_path):
    """The dygraph-route counterpart of test_dist_merge's cond/while_loop teacher (which paddle 3.3's legacy mode
    cannot build): saved once by jit.save with its control flow, loaded by load_teacher, both branches taken by
    the one loaded model, then used in a to_static student."""
    paddle.disable_static()
    paddle.seed(5)
    layer = _ControlFlowTeacher()
    layer.fc.weight.set_value(np.eye(4, dtype="float32") + 0.1 * RNG.randn(4, 4).astype("float32"))
    layer.fc.bias.set_value(np.zeros([4], "float32"))
    prefix = str(tmp_path / "cf" / "inference")
    paddle.jit.save(layer, prefix, input_spec=[paddle.static.InputSpec([None, 4], "float32", "y")])
    w, b = layer.fc.weight.numpy(), layer.fc.bias.numpy()
    teacher = dist.load_teacher(prefix)
    for sign in (1.0, -1.0):   # both branches of the saved cond
        batch = sign * (np.abs(RNG.randn(3, 4)) + 0.5).astype("float32")
        hidden = batch @ w + b
        assert (hidden.mean() > 0) == (sign > 0)
        looped = hidden * 2.0 if hidden.mean() > 0 else hidden - 1.0
        for _ in range(3):
            looped = np.tanh(looped) * 1.5
        np.testing.assert_allclose(teacher(paddle.to_tensor(batch)).numpy(), looped, rtol=1e-5, atol=1e-6)

    paddle.seed(9)
    student = paddle.nn.Linear(4, 4)
    optimizer = paddle.optimizer.Adam(learning_rate=0.05, parameters=student.parameters())

    @paddle.jit.to_static
    def step(x):
        return DF.kl_div_loss(student(x), teacher(x), temperature=2.0)

    x = paddle.to_tensor(RNG.randn(8, 4).astype("float32"))
    losses = []
    for _ in range(20):
        loss = step(x)
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0], losses


def test_missing_teacher_names_both_formats(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.json.*nope\.pdmodel"):
        dist.load_teacher(str(tmp_path / "nope"))


def test_json_teacher_in_legacy_mode_gets_the_projects_error(saved_teacher, tmp_path):
    prefix, _ = saved_teacher
    if paddle_major(paddle) < 3:  # paddle 2.6 cannot save .json: a stand-in file has the name paddle 3 writes
        prefix = str(tmp_path / "pir" / "inference")
        os.makedirs(os.path.dirname(prefix))
        for ext in (".json", ".pdiparams"):
            open(prefix + ext, "w").close()
        match = r"\.json is a PIR model .*paddle 2\.6.* cannot read it"
    else:
        match = r"\.json is a PIR model .*legacy mode .* cannot read it.*dist\.load_teacher"
    with legacy_ir(paddle):
        assert not pir_enabled(paddle)
        with pytest.raises(dist.TeacherFormatError, match=match):
            dist.load_teacher(prefix)
        with static_mode(), pytest.raises(dist.TeacherFormatError, match=match):
            dist.load_teacher_program(prefix, paddle.static.Executor(paddle.CPUPlace()))


def test_merge_route_loads_a_legacy_teacher_and_refuses_pir(tmp_path):
    prefix = str(tmp_path / "legacy" / "inference")
    x = RNG.randn(3, 1, 8, 8).astype("float32")
    with static_mode():
        exe = paddle.static.Executor(paddle.CPUPlace())
        teacher = build(conv_teacher, "img").init(exe, seed=1)
        test_program = teacher.program.clone(for_test=True)
        with paddle.static.scope_guard(teacher.scope):
            expected = exe.run(test_program, feed={"img": x}, fetch_list=[teacher.out["logits"]])[0]
            paddle.static.save_inference_model(prefix, [test_program.global_block().var("img")],
                                               [teacher.out["logits"]], exe, program=test_program)
        scope = paddle.static.Scope()
        with paddle.static.scope_guard(scope):
            program, feeds, fetches = dist.load_teacher_program(prefix, exe)
            got = exe.run(program, feed={feeds[0]: x}, fetch_list=fetches)[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    if paddle_major(paddle) >= 3:
        paddle.enable_static()
        try:
            with pytest.raises(dist.PirProgramError, match=r"PIR programs.*dist\.load_teacher\(path\)"):
                dist.load_teacher_program(prefix, paddle.static.Executor(paddle.CPUPlace()))
        finally:
            paddle.disable_static()


def test_pir_program_error_points_to_the_dygraph_route():
    if paddle_major(paddle) < 3:
        pytest.skip(f"paddle {paddle.__version__} has no PIR programs (they came with paddle 3)")
    paddle.enable_static()
    try:
        program = paddle.static.Program()
        with pytest.raises(dist.PirProgramError, match=r"dist\.load_teacher\(path\).*jit\.to_static"):
            dist.merge(program, paddle.static.Program(), {}, paddle.CPUPlace())
    finally:
        paddle.disable_static()
