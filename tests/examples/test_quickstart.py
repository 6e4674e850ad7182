"""The README's "Service distillation in four steps", run as written: the code blocks are read from README.md (marked
``<!-- quickstart:NAME -->``), so the README and this test cannot drift. Real parts throughout: the teacher trained by
the example script, ``teachers.export``, a ``teachers.serve`` process, the dygraph student script with its
DataLoader and DistillReader workers, ZooKeeper and ``discovery.register``. The only edits: port 9292 becomes a
free port, the ZooKeeper hosts and the teacher address become the test's, the service name a unique one."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import uuid

import pytest

from tests.support.procs import REPO_ROOT, ProcessGuard, free_port, wait_for
from tests.support.teacher import grpc_health

README = os.path.join(REPO_ROOT, "README.md")
STEP_TIMEOUT = 240


def readme_blocks() -> dict[str, str]:
    """``{name: code}`` of every fenced block preceded by ``<!-- quickstart:name -->`` in README.md."""
    with open(README, encoding="utf-8") as f:
        text = f.read()
    blocks = dict(re.findall(r"<!-- quickstart:([\w-]+) -->\n```\w*\n(.*?)\n```", text, flags=re.S))
    assert set(blocks) == {"teacher", "export-serve", "student", "scale-out"}, sorted(blocks)
    return blocks


def shell_commands(block: str) -> list[str]:
    """The commands of a bash block: comments dropped, backslash continuations joined."""
    joined = re.sub(r"\\\n\s*", " ", block)
    lines = [line.split("  #")[0].split(" # ")[0].strip() for line in joined.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def _env() -> dict:
    """As after ``source .venv/bin/activate``: ``python`` is this test's interpreter. DISTILL_OFFLINE: the data is
    Debian's Fashion-MNIST, never a download (the README says how to get either)."""
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    return dict(os.environ, PATH=path, PYTHONPATH=REPO_ROOT, DISTILL_OFFLINE="1", GLOG_minloglevel="2")


def _run(guard: ProcessGuard, command: str, cwd: str, env: dict) -> str:
    proc = guard.start(["bash", "-c", command], env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = proc.communicate(timeout=STEP_TIMEOUT)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, f"{command}\n{text[-4000:]}"
    return text


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    """Steps 0-2 in a fresh folder (``examples`` linked in, as in a clone): the teacher, exported and served.
    Yields (folder, port, blocks, guard) while the teacher serves."""
    blocks = readme_blocks()
    folder = str(tmp_path_factory.mktemp("quickstart"))
    os.symlink(os.path.join(REPO_ROOT, "examples"), os.path.join(folder, "examples"))
    port = free_port()
    with ProcessGuard() as guard:
        (teacher,) = shell_commands(blocks["teacher"])
        _run(guard, teacher, folder, _env())
        export, serve = shell_commands(blocks["export-serve"])
        assert export.startswith("python -m teachers.export") and serve.startswith("python -m teachers.serve")
        exported = _run(guard, export, folder, _env())
        # Export says what it wrote (on paddle 2.6 too, where importing paddle quiets the root logger).
        assert "saved serving model: server folder serving_server, client config serving_client" in exported, \
            exported
        assert os.path.isfile(os.path.join(folder, "serving_client", "serving_client_conf.prototxt"))
        server = guard.start(shlex.split(serve.replace("9292", str(port))), env=_env(), cwd=folder,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: server.poll() is not None or grpc_health(f"127.0.0.1:{port}") == "SERVING", 90,
                 "the README's teacher to serve")
        assert server.poll() is None, "teachers.serve exited"
        yield folder, port, blocks, guard


def _student(folder: str, script: str, guard: ProcessGuard, env: dict) -> str:
    path = os.path.join(folder, f"student_{uuid.uuid4().hex[:6]}.py")
    with open(path, "w") as f:
        f.write(script)
    return _run(guard, f"python {os.path.basename(path)}", folder, env)


def _check_student_output(out: str) -> None:
    # The reader's per-epoch line, shown by the script's one logging line, and the script's own lines.
    lines = re.findall(r"distill_reader\.distill_reader:epoch (\d): 10000 samples in [\d.]+s .* 313 requests", out)
    assert lines == ["1", "2"], out[-3000:]
    printed = re.findall(r"^epoch (\d): loss ([\d.]+), 10000 samples, 313 requests$", out, flags=re.M)
    assert [e for e, _ in printed] == ["1", "2"], out[-3000:]
    accuracy = float(re.search(r"student test accuracy ([\d.]+) \(Fashion-MNIST\)", out).group(1))
    assert accuracy > 0.7, out[-3000:]  # 10 classes: chance is 0.1; the quick teacher reaches about 0.8


def test_quickstart_student_distills_from_the_served_teacher(quickstart):
    folder, port, blocks, guard = quickstart
    script = blocks["student"]
    assert 'dr.set_fixed_teacher("127.0.0.1:9292")' in script
    out = _student(folder, script.replace("127.0.0.1:9292", f"127.0.0.1:{port}"), guard, _env())
    _check_student_output(out)


def test_quickstart_scale_out_through_zookeeper(quickstart, zookeeper):
    folder, port, blocks, guard = quickstart
    commands = shell_commands(blocks["scale-out"])
    assert commands[0].startswith("export DISTILL_ZK_AUTH=") and commands[1].startswith("python -m discovery.register")
    name, value = commands[0][len("export "):].split("=", 1)
    env = dict(_env(), **{name: value})
    service = f"mnist_teacher_{uuid.uuid4().hex[:6]}"

    def ours(text: str) -> str:
        return (text.replace("zk1:2181,zk2:2181", zookeeper.hosts).replace("10.0.0.5:9292", f"127.0.0.1:{port}")
                .replace("mnist_teacher", service))

    register = guard.start(shlex.split(ours(commands[1])), env=env, cwd=folder, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    dynamic = re.search(r"#\s*(dr\.set_dynamic_teacher\(.*\))", blocks["scale-out"]).group(1)
    script = re.sub(r"dr\.set_fixed_teacher\(.*?\)", ours(dynamic), blocks["student"], count=1)
    assert service in script and "set_fixed_teacher" not in script.split("#")[0]
    out = _student(folder, script, guard, env)
    _check_student_output(out)
    assert register.poll() is None, "discovery.register exited"
