"""The err_no table shared by the teacher server and the student's client."""
import numpy as np  # (before paddle: environment.md)
import pytest

from distill_base.status_codes import ErrNo, StatusClass, is_transient, status_class
from distill_reader import client


def test_every_code_has_its_class_and_unknown_codes_are_broken():
    assert [(int(code), status_class(code)) for code in ErrNo] == [
        (0, StatusClass.OK), (3001, StatusClass.BUSY), (5000, StatusClass.INVALID_INPUT),
        (6000, StatusClass.BUSY), (10000, StatusClass.SICK)]
    assert status_class(7000) is StatusClass.BROKEN and status_class(-1) is StatusClass.BROKEN
    assert [code for code in (0, 3001, 5000, 6000, 10000, 7000) if is_transient(code)] == [3001, 6000, 10000]


def test_server_and_client_read_the_same_table():
    from teachers import inference

    answers = [inference.error_response(code, "x") for code in (ErrNo.INPUT, ErrNo.SHUTDOWN, ErrNo.TIMEOUT,
                                                                 ErrNo.INTERNAL)]
    assert [answer.err_no for answer in answers] == [5000, 3001, 6000, 10000]
    assert all(type(answer.err_no) is int for answer in answers)   # protobuf fields hold plain ints
    assert client._err_no_error("t", answers[0].err_no, "x").__class__ is client.TeacherRequestRejected


# -- the student acts on the class: a busy teacher (err_no 6000) is retried elsewhere, never "answer invalid" -----
BUSY_ARGS = ("--predict_timeout", "0.0001", "--merge_requests", "no")   # every predictor run outlasts its timeout


def test_busy_answer_is_transient_for_the_client(teacher_model):
    from distill_reader.client import TeacherClient, TeacherUnavailable
    from tests.support.teacher import TeacherServer, mnist_like_images

    with TeacherServer(teacher_model.server_dir, extra_args=BUSY_ARGS) as busy, \
            TeacherClient(busy.endpoint, teacher_model.client_conf) as client:
        with pytest.raises(TeacherUnavailable, match=r"err_no 6000 \(busy\)"):
            client.predict({"img": mnist_like_images(4)})


def _reader(teacher_model, endpoints, **options):
    from distill_reader import DistillReader

    dr = DistillReader(ins=["img", "label"], predicts=["prediction"], per_teacher_in_flight=4, **options)
    dr.set_fixed_teacher(endpoints)
    dr.set_serving_conf_file(teacher_model.client_conf)
    dr.set_teacher_batch_size(8)
    return dr


def test_busy_teacher_beside_a_healthy_one_every_sample_delivered(teacher_model):
    from tests.support.teacher import TeacherServer, mnist_like_images, reference_predict

    n = 96
    images = mnist_like_images(n, seed=3)
    expected = reference_predict(teacher_model.server_dir, images)
    with TeacherServer(teacher_model.server_dir, extra_args=BUSY_ARGS) as busy, \
            TeacherServer(teacher_model.server_dir) as healthy:
        dr = _reader(teacher_model, [busy.endpoint, healthy.endpoint], request_timeout=60, probe_backoff=0.05)
        busy_errors = 0
        try:
            for _ in range(2):
                out = list(dr.set_sample_generator(lambda: ((images[i], i) for i in range(n)))())
                assert [s[1] for s in out] == list(range(n))
                np.testing.assert_allclose(np.stack([s[2] for s in out]), expected, rtol=1e-5, atol=1e-6)
                stats = dr.last_epoch_stats
                assert stats.complete and stats.samples == n
                assert stats.teachers[healthy.endpoint]["samples"] + stats.teachers[busy.endpoint]["samples"] == n
                busy_errors += stats.teachers[busy.endpoint]["errors"]
            assert busy_errors >= 1   # it was asked, and said 6000
        finally:
            dr.close()


def test_only_busy_teachers_are_retried_not_called_invalid(teacher_model):
    """Both teachers busy: the tasks are retried (a busy teacher may answer later) until the retry budget ends;
    never TeacherAnswerInvalid, which says the answers are wrong."""
    from distill_reader.errors import DistillReaderError, TeacherAnswerInvalid
    from tests.support.teacher import TeacherServer, mnist_like_images

    images = mnist_like_images(16, seed=4)
    with TeacherServer(teacher_model.server_dir, extra_args=BUSY_ARGS) as a, \
            TeacherServer(teacher_model.server_dir, extra_args=BUSY_ARGS) as b:
        dr = _reader(teacher_model, [a.endpoint, b.endpoint], max_retries=3, retry_backoff=0.01,
                     probe_backoff=0.01, all_teachers_down_timeout=30)
        try:
            with pytest.raises(DistillReaderError) as caught:
                list(dr.set_sample_generator(lambda: ((images[i], i) for i in range(16)))())
            assert not isinstance(caught.value, TeacherAnswerInvalid), caught.value
            assert "err_no 6000" in str(caught.value)
        finally:
            dr.close()
