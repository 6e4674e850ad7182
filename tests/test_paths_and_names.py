"""Every path argument of the public API accepts ``os.PathLike`` (``pathlib.Path``) as well as ``str``; names
checked by a pattern (knowledge shards, teacher nodes, services, hosts) match in full, a final newline included."""
from __future__ import annotations

import pathlib

import numpy as np  # noqa: I001  (numpy before paddle)
import pytest

from distill_base.serving_config import ServingConfig
from distill_reader.knowledge import KnowledgeReader, KnowledgeWriter


def test_export_and_serving_config_take_paths(tmp_path: pathlib.Path):
    from teachers.export import inference_model_to_serving
    from tests.support.teacher import save_static_model

    model = tmp_path / "model"
    save_static_model(str(model))
    feeds, fetches = inference_model_to_serving(model, serving_server=tmp_path / "server",
                                                serving_client=tmp_path / "client", fetch_alias_names="prediction")
    assert feeds == ["img"] and fetches == ["prediction"]
    config = ServingConfig.load(tmp_path / "client")
    assert config.feed_names == ["img"]
    saved = config.save(tmp_path / "copy", "serving_client_conf.prototxt")
    assert ServingConfig.load(pathlib.Path(saved)).fetch_names == ["prediction"]


def test_save_model_takes_paths(tmp_path: pathlib.Path):
    import paddle

    from teachers.export import save_model
    from tests.support.teacher import build_mnist_cnn

    main, startup, img, prediction = build_mnist_cnn()
    scope = paddle.static.Scope()
    try:
        with paddle.static.scope_guard(scope):
            paddle.static.Executor(paddle.CPUPlace()).run(startup)
            feeds, fetches = save_model(tmp_path / "server", tmp_path / "client", {"img": img},
                                        {"prediction": prediction}, main_program=main, scope=scope)
    finally:
        paddle.disable_static()
    assert (feeds, fetches) == (["img"], ["prediction"])
    assert ServingConfig.load(tmp_path / "client").feed_names == ["img"]


def test_reader_conf_file_and_offline_cache_take_paths(tmp_path: pathlib.Path, teacher_model):
    from distill_reader import DistillReader

    dr = DistillReader(ins=["img"], predicts=["prediction"])
    try:
        dr.set_serving_conf_file(pathlib.Path(teacher_model.client_conf))
        dr.set_offline_cache(tmp_path / "cache")
        assert dr.config.feed_names == ["img"]
    finally:
        dr.close()


def test_knowledge_files_take_paths(tmp_path: pathlib.Path):
    logits = np.arange(40, dtype="float32").reshape(4, 10)
    with KnowledgeWriter(tmp_path / "kn", {"logits": ((10,), "float32")}) as writer:
        writer.append({"logits": logits})
    with KnowledgeReader(tmp_path / "kn") as reader:
        np.testing.assert_array_equal(reader.read(0, 4)["logits"], logits)


def test_pantheon_offline_knowledge_takes_paths(tmp_path: pathlib.Path):
    from distill_reader.pantheon.knowledge_files import OfflineKnowledgeReader, OfflineKnowledgeWriter

    batch = {"y": np.arange(6, dtype="float32").reshape(3, 2)}
    writer = OfflineKnowledgeWriter(tmp_path / "knowledge", {"y": {"shape": [-1, 2], "dtype": "float32"}})
    writer.write(batch)
    writer.close()
    reader = OfflineKnowledgeReader(tmp_path / "knowledge")
    try:
        np.testing.assert_array_equal(next(reader.batches())["y"], batch["y"])
    finally:
        reader.close()


def test_client_security_files_take_paths(tmp_path: pathlib.Path, teacher_model):
    from distill_base.client_security import ClientSecurity
    from distill_reader.client import TeacherClient
    from tests.support.tls import make_pki

    pki = make_pki(tmp_path)
    security = ClientSecurity.create(pathlib.Path(pki.ca_cert), pathlib.Path(pki.client_cert),
                                     pathlib.Path(pki.client_key))
    assert security.settings() == {"tls_ca": pki.ca_cert, "tls_cert": pki.client_cert, "tls_key": pki.client_key,
                                   "token": None}   # plain strings: what the worker processes get
    assert security.requests_options()["verify"] == pki.ca_cert
    TeacherClient("127.0.0.1:1", pathlib.Path(teacher_model.client_conf), tls_ca=pathlib.Path(pki.ca_cert)).close()


@pytest.mark.parametrize("suffix", ["\n", "x", "/"])
def test_knowledge_shard_names_match_in_full(tmp_path: pathlib.Path, suffix: str):
    """A manifest whose shard name has anything after ``.bin`` (a final newline included) is refused."""
    import json

    from distill_reader.knowledge import FormatError

    with KnowledgeWriter(tmp_path / "kn", {"y": ((2,), "float32")}) as writer:
        writer.append({"y": np.zeros((3, 2), "float32")})
    manifest_path = tmp_path / "kn" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    name = manifest["shards"][0]["file"]
    manifest["shards"][0]["file"] = name + suffix
    (tmp_path / "kn" / (name + suffix)).write_bytes((tmp_path / "kn" / name).read_bytes()) if suffix != "/" else None
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(FormatError, match="shard file name .* is not allowed"):
        KnowledgeReader(tmp_path / "kn")


def test_names_checked_by_pattern_match_in_full():
    """Teacher node names, service names and host names: a final newline is not part of a valid name."""
    import json

    from discovery.arguments import ServicePaths
    from discovery.nodes import NodeDataError, parse_assignment
    from distill_base.endpoints import parse_endpoint

    good = {"teachers": ["teacher-0000000001"], "endpoints": ["127.0.0.1:9292"]}
    assert parse_assignment("s", json.dumps(good).encode()).teachers == ("teacher-0000000001",)
    with pytest.raises(NodeDataError, match="teacher node names"):
        parse_assignment("s", json.dumps({**good, "teachers": ["teacher-0000000001\n"]}).encode())
    assert ServicePaths("/distill", "mnist").service == "mnist"
    with pytest.raises(ValueError, match="service name"):
        ServicePaths("/distill", "mnist\n")
    assert str(parse_endpoint("teacher-a.local:9292")) == "teacher-a.local:9292"
    with pytest.raises(ValueError):
        parse_endpoint("teacher-a.local\n:9292")
