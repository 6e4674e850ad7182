"""Fuzzing in the suite (issue 26): every entry point of untrusted bytes has a harness (tests/fuzz/harnesses.py);
every harness passes its corpus (seeds from the project's encoders and writers, and every input that ever found
a fault), then fuzzes for a few seconds with atheris from it. The long run is documented in docs/security.md."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.fuzz.harnesses import HARNESSES, MAX_SECONDS, Finding, Harness, check_input

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(ROOT, "tests", "fuzz", "corpus")
SHORT_RUN_S = 4

# The entry points of untrusted bytes issue 26 lists, and the harness that covers each.
ENTRY_POINTS = {
    "gRPC request parse and validation": "grpc_request",
    "HTTP/JSON and gzip bodies": "http_body",
    "LoD checks and merging": "lod_merge",
    "tensor codec both ways": "tensor_codec",
    "the client's answer decoding": "client_answer",
    "knowledge manifest": "knowledge_manifest",
    "knowledge shard headers and digests": "knowledge_shard",
    "Pantheon frames and descriptions": "pantheon_frame",
    "Pantheon transport and the student's reader": "pantheon_transport",
    "ZooKeeper node data": "zk_nodes",
    "endpoints": "endpoints",
    "serving configs": "serving_config",
}


def _corpus(name: str) -> list[str]:
    folder = os.path.join(CORPUS, name)
    return sorted(os.path.join(folder, entry) for entry in os.listdir(folder))


def test_every_entry_point_has_a_harness_and_a_seeded_corpus():
    assert sorted(ENTRY_POINTS.values()) == sorted(HARNESSES)
    for name in HARNESSES:
        files = [os.path.basename(path) for path in _corpus(name)]
        assert any(f.startswith("seed-") for f in files), name


def test_an_input_slow_twice_is_a_finding_a_single_stall_is_not():
    """The hang check (MAX_SECONDS) runs a slow input again: a machine too loaded for one run is not a hang."""
    import time

    calls = []

    def stalls_once(data: bytes) -> None:
        calls.append(data)
        if len(calls) == 1:
            time.sleep(MAX_SECONDS + 0.2)

    check_input(Harness("stall", stalls_once, ()), b"x")
    assert len(calls) == 2
    with pytest.raises(Finding, match=r"hang: 1-byte input took .*s twice"):
        check_input(Harness("hang", lambda data: time.sleep(MAX_SECONDS + 0.2), ()), b"x")


@pytest.mark.parametrize("name", sorted(HARNESSES))
def test_corpus_inputs_get_only_documented_errors_in_time_and_memory(name):
    """Each input of the corpus, faults found so far included (their file names say which)."""
    for path in _corpus(name):
        with open(path, "rb") as f:
            data = f.read()
        try:
            check_input(HARNESSES[name], data)
        except BaseException as exc:
            raise AssertionError(f"{os.path.relpath(path, ROOT)}: {type(exc).__name__}: {exc}") from exc


@pytest.mark.parametrize("name", sorted(HARNESSES))
def test_short_fuzzing_run_finds_nothing(name, tmp_path):
    """A few seconds of coverage-guided fuzzing from the corpus (python -m tests.fuzz, atheris)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-m", "tests.fuzz", name, "--scratch", str(tmp_path),
                             f"-max_total_time={SHORT_RUN_S}"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=SHORT_RUN_S + 90)
    findings = [p.name for p in tmp_path.iterdir() if p.name.startswith("finding-")]
    assert result.returncode == 0 and not findings, (
        f"fuzzing {name} found {findings}:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    assert "Done" in result.stderr and "stat::number_of_executed_units" in result.stderr, result.stderr[-2000:]
