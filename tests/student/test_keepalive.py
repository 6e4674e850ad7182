"""Keepalive against a standard grpcio server with default options (grpc-core's ping policy: a ping at most every
5 minutes without data, two strikes, then GOAWAY too_many_pings): the client must not ping such a server into
closing the connection, nor set it aside. Our own server (teachers.serve) permits the pings and gets them."""
from __future__ import annotations

import logging
import time

import numpy as np  # noqa: I001  (numpy before paddle)
import pytest

from distill_reader import DistillReader
from distill_reader.client import TeacherClient
from tests.support.plain_grpc import PlainGrpcServer, expected_answer, write_client_conf
from tests.support.teacher import mnist_like_images

DELAY = 6.0   # seconds per answer: longer than grpc-core's 5 s before a ping-happy client gets GOAWAY


@pytest.fixture(scope="module")
def plain_conf(tmp_path_factory) -> str:
    """The plain server's client config, written without paddle (this file is paddle_free)."""
    return write_client_conf(str(tmp_path_factory.mktemp("plain_conf")))


def test_client_against_a_plain_grpcio_server_gets_no_goaway(plain_conf, caplog):
    images = mnist_like_images(4, seed=1)
    caplog.set_level(logging.INFO, logger="distill_reader")
    with PlainGrpcServer(delay=DELAY) as server, \
            TeacherClient(server.endpoint, plain_conf, timeout=30, keepalive_time=1.0) as client:
        for _ in range(2):
            started = time.monotonic()
            out = client.predict({"img": images})
            took = time.monotonic() - started
            np.testing.assert_allclose(out["prediction"], expected_answer(images), rtol=1e-5)
            assert DELAY - 0.5 < took < DELAY + 2.5, f"one request took {took:.1f}s"
        assert client.keepalive_active is False   # not our server: no pings
    assert "too_many_pings" not in caplog.text


def test_reader_against_a_plain_grpcio_server_one_batch_per_delay(plain_conf, caplog):
    images = mnist_like_images(32, seed=2)
    caplog.set_level(logging.INFO, logger="distill_reader")
    with PlainGrpcServer(delay=DELAY) as server:
        dr = DistillReader(ins=["img", "label"], predicts=["prediction"], request_timeout=30, keepalive_time=1.0,
                           per_teacher_in_flight=1, num_workers=1, stall_min_timeout=20, hedge_budget=0)
        dr.set_fixed_teacher([server.endpoint])
        dr.set_serving_conf_file(plain_conf)
        dr.set_teacher_batch_size(16)
        try:
            started = time.monotonic()
            out = list(dr.set_batch_generator(lambda: ((images[s:s + 16], np.arange(s, s + 16))
                                                       for s in (0, 16)))())
            took = time.monotonic() - started
        finally:
            dr.close()
    np.testing.assert_allclose(np.concatenate([b[2] for b in out]), expected_answer(images), rtol=1e-5)
    stats = dr.last_epoch_stats
    assert stats.teachers[server.endpoint]["errors"] == 0 and stats.stage["retries"] == 0, stats
    assert took < 2 * DELAY + 4, f"two {DELAY:g} s batches took {took:.1f}s"
    assert "set aside" not in caplog.text and "too_many_pings" not in caplog.text


def test_reader_defaults_a_teacher_slower_than_5s_is_stalled_once_not_every_request(plain_conf, caplog):
    """Default stall settings: a teacher of unknown latency is called stalled after 5 s (its first request here);
    from its first answer on the stall timeout follows the latency seen (4 x 6 s), so later epochs run at the
    teacher's pace with no stall, no retry, and no GOAWAY."""
    images = mnist_like_images(16, seed=3)
    caplog.set_level(logging.INFO, logger="distill_reader")
    with PlainGrpcServer(delay=DELAY) as server:
        dr = DistillReader(ins=["img", "label"], predicts=["prediction"], request_timeout=60, keepalive_time=1.0)
        dr.set_fixed_teacher([server.endpoint])
        dr.set_serving_conf_file(plain_conf)
        dr.set_teacher_batch_size(16)
        generator = dr.set_batch_generator(lambda: iter([(images, np.arange(16))]))
        try:
            stalls, seconds = [], []
            for _ in range(3):
                started = time.monotonic()
                out = list(generator())
                seconds.append(time.monotonic() - started)
                np.testing.assert_allclose(out[0][2], expected_answer(images), rtol=1e-5)
                stalls.append(dr.last_epoch_stats.stage["stalls"])
        finally:
            dr.close()
    assert stalls[0] <= 1 and stalls[1:] == [0, 0], stalls
    assert max(seconds[1:]) < DELAY + 2, seconds
    assert "too_many_pings" not in caplog.text
