"""Teacher transport security end to end with real servers, real certificates (made at test time) and real
clients: TLS, mutual TLS and bearer tokens on gRPC and HTTP; a wrong CA, a missing or foreign client certificate
and a wrong or missing token are each refused with a clear error; DistillReader over TLS with a token; a TLS
teacher registered in ZooKeeper is used by TLS students and left out by plaintext ones."""
from __future__ import annotations

import json
import os
import subprocess
import time

import numpy as np  # noqa: I001  (numpy before paddle)
import pytest
import requests

from distill_base.client_security import ClientSecurity
from distill_reader import DistillReader
from distill_reader.client import TeacherAuthError, TeacherClient, TeacherTlsError
from distill_reader.errors import TeacherAuthRefused
from tests.support.procs import ProcessGuard, wait_for
from tests.support.teacher import TeacherServer, grpc_health, mnist_like_images, reference_predict
from tests.support.tls import make_pki

TOKEN = "s3cret-token-for-tests"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def token_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("token") / "token"
    path.write_text(TOKEN + "\n")
    os.chmod(path, 0o600)
    return str(path)


@pytest.fixture(scope="module")
def tls_teacher(teacher_model, pki, token_file):
    """TLS with a token, gRPC and HTTP."""
    with TeacherServer(teacher_model.server_dir, http=True, health_security=ClientSecurity(pki.ca_cert),
                       extra_args=["--tls_cert", pki.server_cert, "--tls_key", pki.server_key,
                                   "--token_file", token_file]) as server:
        yield server


@pytest.fixture(scope="module")
def mtls_teacher(teacher_model, pki):
    security = ClientSecurity(pki.ca_cert, pki.client_cert, pki.client_key)
    with TeacherServer(teacher_model.server_dir, http=True, health_security=security,
                       extra_args=["--tls_cert", pki.server_cert, "--tls_key", pki.server_key,
                                   "--tls_client_ca", pki.ca_cert]) as server:
        yield server


def _predict(endpoint, teacher_model, protocol="grpc", **security):
    images = mnist_like_images(4, seed=2)
    with TeacherClient(endpoint, teacher_model.client_conf, protocol=protocol, timeout=5, **security) as client:
        return client.predict({"img": images})["prediction"], reference_predict(teacher_model.server_dir, images)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_tls_and_token_answer_the_right_client(tls_teacher, teacher_model, pki, protocol):
    endpoint = tls_teacher.endpoint if protocol == "grpc" else tls_teacher.http_endpoint
    got, want = _predict(endpoint, teacher_model, protocol, tls_ca=pki.ca_cert, token=TOKEN)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(TeacherAuthError, match="UNAUTHENTICATED|HTTP 401"):
        _predict(endpoint, teacher_model, protocol, tls_ca=pki.ca_cert, token="not-the-token")
    if protocol == "grpc":   # the first refusal of this server (one is logged per 10 s) names the peer
        wait_for(lambda: "refused a gRPC request without the right bearer token from ipv4:127.0.0.1:"
                 in tls_teacher.log(), timeout=5, what="the refusal logged with its peer")
    with pytest.raises(TeacherAuthError, match="bearer token"):
        _predict(endpoint, teacher_model, protocol, tls_ca=pki.ca_cert)
    # TLS settings that retrying cannot fix are TeacherTlsError (an auth error: the reader gives up at once)
    with pytest.raises(TeacherTlsError, match="TLS handshake failed: .*(?i:certificate.verify.failed)"):
        _predict(endpoint, teacher_model, protocol, tls_ca=pki.other_ca_cert, token=TOKEN)
    with pytest.raises(TeacherTlsError, match="the teacher serves TLS but this client connects in plaintext: "
                                              "give tls_ca"):
        _predict(endpoint, teacher_model, protocol, token=TOKEN)


def test_health_checks_stay_open_without_a_token(tls_teacher, pki):
    assert grpc_health(tls_teacher.endpoint, security=ClientSecurity(pki.ca_cert)) == "SERVING"
    answer = requests.get(f"https://{tls_teacher.http_endpoint}/health", verify=pki.ca_cert, timeout=5)
    assert answer.status_code == 200
    refused = requests.post(f"https://{tls_teacher.http_endpoint}/GeneralModelService/inference", data=b"{}",
                            verify=pki.ca_cert, timeout=5)
    assert refused.status_code == 401 and "bearer token" in refused.json()["err_msg"]


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_mutual_tls_needs_a_client_certificate_from_the_ca(mtls_teacher, teacher_model, pki, protocol):
    endpoint = mtls_teacher.endpoint if protocol == "grpc" else mtls_teacher.http_endpoint
    got, want = _predict(endpoint, teacher_model, protocol, tls_ca=pki.ca_cert, tls_cert=pki.client_cert,
                         tls_key=pki.client_key)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(TeacherTlsError, match=r"does not accept this client's certificate \(no client cert"):
        _predict(endpoint, teacher_model, protocol, tls_ca=pki.ca_cert)
    with pytest.raises(TeacherTlsError, match="does not accept this client's certificate .*client certificate "
                                              ".*stranger"):
        _predict(endpoint, teacher_model, protocol, tls_ca=pki.ca_cert, tls_cert=pki.stranger_cert,
                 tls_key=pki.stranger_key)


@pytest.mark.parametrize("case", ["plaintext", "wrong_ca"])
def test_distill_reader_gives_up_at_once_on_a_tls_mismatch(tls_teacher, teacher_model, pki, case):
    """Retrying cannot fix TLS settings: TeacherAuthRefused long before all_teachers_down_timeout (60 s)."""
    security = {"tls_ca": pki.other_ca_cert} if case == "wrong_ca" else {}
    dr = DistillReader(ins=["img"], predicts=["prediction"], token=TOKEN, **security)
    dr.set_fixed_teacher(tls_teacher.endpoint)
    dr.set_serving_conf_file(teacher_model.client_conf)
    images = mnist_like_images(8, seed=5)
    started = time.monotonic()
    try:
        with pytest.raises(TeacherAuthRefused, match="plaintext: give tls_ca" if case == "plaintext"
                                                      else "(?i)certificate.verify.failed"):
            list(dr.set_batch_generator(lambda: iter([(images,)]))())
    finally:
        dr.close()
    assert time.monotonic() - started < 30


def test_bad_security_flags_are_refused_at_start(teacher_model, pki, tmp_path):
    empty = tmp_path / "empty"
    empty.write_text("\n")
    cases = [(["--tls_cert", pki.server_cert], "--tls_cert and --tls_key go together"),
             (["--tls_client_ca", pki.ca_cert], "needs TLS"),
             (["--tls_cert", pki.server_cert, "--tls_key", str(tmp_path / "missing.key")], "missing.key"),
             (["--token_file", str(empty)], "one non-empty line")]
    with ProcessGuard() as guard:
        for flags, message in cases:
            proc = guard.python("-m", "teachers.serve", "--model", teacher_model.server_dir, "--host", "127.0.0.1",
                                "--port", "0", *flags, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            out, _ = proc.communicate(timeout=120)
            assert proc.returncode != 0 and message in out.decode(errors="replace"), (flags, out[-2000:])


def test_distill_reader_over_tls_with_a_token(tls_teacher, teacher_model, pki, monkeypatch):
    images = mnist_like_images(96, seed=4)
    ref = reference_predict(teacher_model.server_dir, images)
    monkeypatch.setenv("DISTILL_TEACHER_TOKEN", TOKEN)      # the token from the environment, as documented
    dr = DistillReader(ins=["img"], predicts=["prediction"], tls_ca=pki.ca_cert)
    dr.set_fixed_teacher(tls_teacher.endpoint)
    dr.set_serving_conf_file(teacher_model.client_conf)
    try:
        out = list(dr.set_batch_generator(lambda: ((images[i:i + 32],) for i in range(0, 96, 32)))())
        np.testing.assert_allclose(np.concatenate([b[1] for b in out]), ref, rtol=1e-5, atol=1e-6)
    finally:
        dr.close()
    wrong = DistillReader(ins=["img"], predicts=["prediction"], tls_ca=pki.ca_cert, token="wrong")
    wrong.set_fixed_teacher(tls_teacher.endpoint)
    wrong.set_serving_conf_file(teacher_model.client_conf)
    try:
        with pytest.raises(TeacherAuthRefused, match="credentials"):
            list(wrong.set_batch_generator(lambda: iter([(images[:8],)]))())
    finally:
        wrong.close()


def test_a_tls_teacher_in_zookeeper_is_used_by_tls_students_only(tls_teacher, teacher_model, pki, zookeeper,
                                                                  zk_root, tmp_path, caplog):
    from kazoo.client import KazooClient

    from discovery.student import TeacherSubscription

    env = {"DISTILL_ZK_AUTH": "teacher:pw"}
    with ProcessGuard() as guard:
        guard.python("-m", "discovery.register", "--zk", zookeeper.hosts, "--service", "secure", "--root", zk_root,
                     "--endpoint", tls_teacher.endpoint, "--tls_ca", pki.ca_cert, "--session_timeout", "2",
                     "--health_interval", "0.2", env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        seen = {}
        tls_student = TeacherSubscription(zookeeper.hosts, "secure", on_change=lambda e: seen.update(tls=e),
                                          root=zk_root, session_timeout=2.0, tls=True).start()
        plain_student = TeacherSubscription(zookeeper.hosts, "secure", on_change=lambda e: seen.update(plain=e),
                                            root=zk_root, session_timeout=2.0, tls=False).start()
        try:
            assert tls_student.wait_for_teachers(30) == [tls_teacher.endpoint]
            wait_for(lambda: plain_student.teachers, 10, "the plaintext student reading the teacher node")
            assert plain_student.endpoints == [] and seen.get("plain", []) == []
            assert any("serves TLS but this student does not: left out" in r.getMessage() for r in caplog.records)
            client = KazooClient(hosts=zookeeper.hosts)
            client.start(timeout=10)
            try:
                path = f"{zk_root}/secure"
                (name,) = [n for n in client.get_children(path) if n.startswith("teacher-")]
                assert json.loads(client.get(f"{path}/{name}")[0])["tls"] is True
            finally:
                client.stop()
                client.close()
        finally:
            tls_student.stop()
            plain_student.stop()
