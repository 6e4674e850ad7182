"""Messages that must send the user the right way (issue 24): no TLS hint for a plaintext teacher that died, a busy
port named as such without drain lines, the ZooKeeper registration lines in the order things happen, flags ignored
for a model said at WARNING, labelled progress-bar losses, and --help showing every default with flags grouped."""
from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import threading

import numpy as np  # noqa: F401  (numpy before paddle: paddle 2.6.2 exports zlib symbols)
import pytest

from distill_reader.client import TeacherClient, TeacherUnavailable
from tests.support.procs import REPO_ROOT, ProcessGuard, free_port, wait_for
from tests.support.teacher import TeacherServer, mnist_like_images

MNIST_EXAMPLE = os.path.join(REPO_ROOT, "examples", "mnist")


def _env(**extra: str) -> dict:
    return {**os.environ, "PYTHONPATH": REPO_ROOT, "GLOG_minloglevel": "2", **extra}


def _run(*args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    with ProcessGuard() as guard:
        proc = guard.python(*args, env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO_ROOT)
        out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out.decode(errors="replace"),
                                       err.decode(errors="replace"))


# -- TLS hints only when TLS is in play ----------------------------------------------------------------------
def test_plaintext_teacher_killed_mid_request_gets_no_tls_hint(teacher_model):
    """The teacher dies while a request is on the wire: the connection is reset, which a TLS mismatch also does;
    a plaintext client, whose probe finds no TLS there, must not be told to check its TLS options."""
    with TeacherServer(teacher_model.server_dir, thread=1) as server:
        client = TeacherClient(server.endpoint, teacher_model.client_conf, timeout=30)
        try:
            client.predict({"img": mnist_like_images(2)})  # connected
            server.kill(signal.SIGSTOP)                     # the request below waits on the wire
            errors: list = []
            call = threading.Thread(target=lambda: errors.append(_failure(client)), daemon=True)
            call.start()
            threading.Event().wait(1.0)
            server.kill(signal.SIGKILL)                     # mid-request: the kernel resets the connection
            call.join(30)
        finally:
            client.close()
    assert len(errors) == 1 and isinstance(errors[0], TeacherUnavailable), errors
    message = str(errors[0])
    assert server.endpoint in message
    assert "tls" not in message.lower(), message


def _failure(client: TeacherClient) -> BaseException:
    try:
        client.predict({"img": mnist_like_images(2)})
    except BaseException as exc:  # noqa: BLE001 - the test inspects it
        return exc
    return AssertionError("the request to a killed teacher succeeded")


# -- busy port -------------------------------------------------------------------------------------------
def test_busy_grpc_port_says_already_in_use_and_exits_without_drain_lines(teacher_model):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        run = _run("-m", "teachers.serve", "--model", teacher_model.server_dir, "--host", "127.0.0.1",
                   "--port", str(busy), "--thread", "1")
    assert run.returncode == 2, run.stderr[-3000:]
    assert f"cannot bind gRPC port 127.0.0.1:{busy} (already in use" in run.stderr, run.stderr[-3000:]
    for drain_line in ("draining", "stopped after", "transports did not stop"):
        assert drain_line not in run.stderr, run.stderr[-3000:]


# -- --zk log order --------------------------------------------------------------------------------------
def test_serve_zk_logs_registration_in_the_order_it_happens(teacher_model, zookeeper, zk_root, tmp_path):
    log_file = tmp_path / "serve.log"
    with ProcessGuard() as guard:
        with open(log_file, "wb") as log:
            guard.python("-m", "teachers.serve", "--model", teacher_model.server_dir, "--host", "127.0.0.1",
                         "--port", str(free_port()), "--thread", "1", "--zk", zookeeper.hosts, "--service", "order",
                         "--root", zk_root, env=_env(DISTILL_ZK_AUTH="teacher:secret"), stdout=log,
                         stderr=subprocess.STDOUT)
        wait_for(lambda: re.search(r"INFO \S+: registered ", log_file.read_text()), 90, "the 'registered' line")
    out = log_file.read_text()
    order = ["in the background", "waiting for its health check", "answers its health check: registering",
             ": registered "]
    where = [out.find(line) for line in order]
    assert -1 not in where and where == sorted(where), (where, out[-3000:])


# -- flags ignored for a model -------------------------------------------------------------------------------
class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[tuple[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((record.levelname, record.getMessage()))


def test_mem_optim_given_for_a_pir_model_warns(teacher_model_jit, teacher_model, tmp_path):
    import paddle

    from teachers import serve

    with_pir = int(paddle.__version__.split(".")[0]) >= 3
    pir_dir = teacher_model_jit.server_dir
    if not with_pir:   # paddle 2.6 writes no PIR model: the same files by name (the check reads the file name)
        pir_dir = str(tmp_path / "pir_like")
        os.makedirs(pir_dir)
        for name in ("model.json", "params.pdiparams"):
            open(os.path.join(pir_dir, name), "wb").close()
    # a program-desc model (.pdmodel): paddle 2.6's own export; paddle 3 saves PIR even from static graphs
    pdmodel_dir = teacher_model.server_dir
    if with_pir:
        pdmodel_dir = str(tmp_path / "pdmodel_like")
        os.makedirs(pdmodel_dir)
        for name in ("model.pdmodel", "params.pdiparams"):
            open(os.path.join(pdmodel_dir, name), "wb").close()
    records = _Records()
    serve.logger.addHandler(records)
    try:
        for argv, model_dir, warned in ((["--mem_optim", "True"], pir_dir, True), ([], pir_dir, False),
                                        (["--mem_optim", "True"], pdmodel_dir, False)):
            records.lines.clear()
            args = serve.parse_args(["--model", model_dir, *argv])
            serve._warn_mem_optim(args, args.model[0])
            about = [(level, msg) for level, msg in records.lines if "--mem_optim" in msg]
            if warned:
                assert len(about) == 1 and about[0][0] == "WARNING" and "PIR model" in about[0][1] \
                    and "ignored" in about[0][1], records.lines
            else:
                assert about == [], records.lines
    finally:
        serve.logger.removeHandler(records)
    if with_pir:   # the real server says it at start, at WARNING
        with TeacherServer(teacher_model_jit.server_dir, thread=1, extra_args=["--mem_optim", "True"]) as server:
            log = server.log()
        assert re.search(r"WARNING teachers\.serve\[\d+\]: --mem_optim: .*PIR model .*ignored", log), log[-3000:]


# -- progress bars label their losses ---------------------------------------------------------------------
def test_progress_bar_labels_the_distillation_loss():
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import train_with_fleet as t\n"
            "for argv in ([], ['--use_distill_service', '--distill_temperature', '2', '--hard_label_weight', '0.5'],"
            " ['--use_distill_service']):\n"
            "    print(t.loss_label(t.parse_args(argv)))")
    run = _run("-c", code, MNIST_EXAMPLE)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.splitlines()[-3:] == ["loss = label CE", "loss = 0.5 label CE + 0.5 T^2 soft CE (T=2)",
                                            "loss = soft CE"]
    with open(os.path.join(MNIST_EXAMPLE, "train_with_fleet.py")) as f:
        source = f.read()
    assert "({loss_label(args)})" in source and '"label CE": f"{float(hard_loss):.4f}"' in source


# -- --help: defaults everywhere, flags grouped ----------------------------------------------------------
HELP_CASES = {
    "teachers.serve": (["-m", "teachers.serve"], {"--model"}),
    "teachers.export": (["-m", "teachers.export"], {"--dirname"}),
    "discovery.register": (["-m", "discovery.register"], {"--endpoint", "--zk", "--service"}),
    "local_flow.py": ([os.path.join(MNIST_EXAMPLE, "local_flow.py")], set()),
    "train_with_fleet.py": ([os.path.join(MNIST_EXAMPLE, "train_with_fleet.py")], set()),
}


def help_entries(text: str) -> dict[str, tuple[str, str]]:
    """``{--flag: (group title, help text)}`` from an argparse --help page."""
    entries: dict[str, tuple[str, str]] = {}
    group, flag = "", None
    for line in text.splitlines():
        if line and not line.startswith(" ") and line.endswith(":"):
            group, flag = line[:-1], None
            continue
        match = re.match(r"^  (-\w, )?(--\w+)(.*)$", line)
        if match:
            flag = match.group(2)
            entries[flag] = (group, match.group(3))
        elif flag and line.startswith("    "):
            entries[flag] = (group, entries[flag][1] + " " + line.strip())
    return entries


@pytest.mark.parametrize("name", sorted(HELP_CASES))
def test_help_shows_every_default(name):
    argv, required = HELP_CASES[name]
    run = _run(*argv, "--help")
    assert run.returncode == 0, run.stderr[-3000:]
    entries = help_entries(run.stdout)
    assert len(entries) > 3, run.stdout
    missing = [flag for flag, (_, text) in entries.items()
               if flag not in required | {"--help"} and "default" not in text.lower()]
    assert not missing, f"{name} --help: no default shown for {missing}"


def test_serve_help_groups_flags_and_takes_one_model():
    run = _run("-m", "teachers.serve", "--help")
    entries = help_entries(run.stdout)
    assert entries["--advertise_host"][0] == entries["--zk"][0] == "ZooKeeper registration"
    assert entries["--tls_cert"][0].startswith("transport security")
    assert re.search(r"--model DIR \[", run.stdout) and "DIR [DIR ...]" not in run.stdout, run.stdout[:600]
    two = _run("-m", "teachers.serve", "--model", "a", "b")
    assert two.returncode == 2 and "--model takes one DIR" in two.stderr, two.stderr


def test_mnist_scripts_group_their_flags():
    for script, groups in (("local_flow.py", {"what to run", "data", "training", "teacher server"}),
                           ("train_with_fleet.py", {"model and training", "data", "output",
                                                    "teacher side (--save_serving_model)",
                                                    "student side (--use_distill_service)"})):
        run = _run(os.path.join(MNIST_EXAMPLE, script), "--help")
        assert groups <= {group for group, _ in help_entries(run.stdout).values()}, (script, run.stdout[-2000:])



# -- a skipped test is reported under its own name ----------------------------------------------------------
def test_skip_in_a_helper_is_reported_at_the_test(tmp_path):
    (tmp_path / "helper.py").write_text("import pytest\n\n\ndef need():\n    pytest.skip('no such thing here')\n")
    (tmp_path / "test_uses_helper.py").write_text(
        "from helper import need\n\n\ndef test_first():\n    need()\n\n\ndef test_second():\n    need()\n")
    run = _run("-m", "pytest", "-p", "tests.support.skip_location", "-rs", "-p", "no:cacheprovider",
               "--rootdir", str(tmp_path), str(tmp_path), PYTHONPATH=f"{REPO_ROOT}{os.pathsep}{tmp_path}")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    skipped = [line for line in run.stdout.splitlines() if line.startswith("SKIPPED")]
    assert len(skipped) == 2, run.stdout[-3000:]  # one line per test, not one folded line at the helper
    for name, line in (("test_first", 4), ("test_second", 8)):
        assert any(f"test_uses_helper.py:{line}: no such thing here [test_uses_helper.py::{name}; skipped in "
                   in s and "helper.py:5]" in s for s in skipped), (name, skipped)
