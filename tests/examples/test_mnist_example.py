"""The MNIST example end to end on a small slice of Debian's Fashion-MNIST (installed by scripts/setup.sh; or the
MNIST-format folder in DISTILL_MNIST_DIR): teacher trained, exported and served by a real teachers.serve process;
students trained alone and with DistillReader; the server stopped afterwards; then
two fleet trainers (paddle.distributed.launch, CPU) distilling from a served teacher."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.support.procs import MNIST_DIR, REPO_ROOT, ProcessGuard, free_port, pid_alive, port_is_open, wait_for

EXAMPLE = os.path.join(REPO_ROOT, "examples", "mnist")
SEED = 3


def _env() -> dict:
    return {"PYTHONPATH": REPO_ROOT, "GLOG_minloglevel": "2"}


TRAIN, VAL, TEST, LABELLED = 1600, 200, 500, 400  # the flow's slice: 1,400 training images, 400 of them labelled


@pytest.fixture(scope="module")
def flow(tmp_path_factory):
    """Run local_flow.py once (tiny, both settings, one seed): returns (workdir, results, stdout)."""
    workdir = str(tmp_path_factory.mktemp("mnist_flow"))
    args = [os.path.join(EXAMPLE, "local_flow.py"), "--data_dir", MNIST_DIR, "--epochs", "3", "--teacher_epochs", "3",
            "--train_samples", str(TRAIN), "--val_samples", str(VAL), "--test_samples", str(TEST),
            "--labelled_samples", str(LABELLED), "--seeds", str(SEED), "--thread", "1", "--workdir", workdir,
            "--no_progress"]
    with ProcessGuard() as guard:
        proc = guard.python(*args, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        out, _ = proc.communicate(timeout=240)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text[-3000:]
    with open(os.path.join(workdir, "results.json")) as f:
        return workdir, json.load(f), text


def _mnist_data():
    sys.path.insert(0, EXAMPLE)
    try:
        import data as mnist_data
    finally:
        sys.path.remove(EXAMPLE)
    return mnist_data


def _local_teacher(workdir: str, images: np.ndarray) -> np.ndarray:
    """The teacher's prediction computed here with Paddle Inference from the saved inference model."""
    import paddle.inference as pi

    prefix = os.path.join(workdir, "teacher_inference", "model")
    config = pi.Config(prefix + ".pdmodel", prefix + ".pdiparams")
    config.disable_gpu()
    predictor = pi.create_predictor(config)
    handle = predictor.get_input_handle(predictor.get_input_names()[0])
    handle.reshape(images.shape)
    handle.copy_from_cpu(np.ascontiguousarray(images))
    predictor.run()
    return predictor.get_output_handle(predictor.get_output_names()[0]).copy_to_cpu()


def test_served_soft_labels_reach_the_student(flow):
    workdir, results, _ = flow
    fed = np.load(os.path.join(workdir, f"soft_labels_a_seed{SEED}.npz"))
    assert set(fed.files) == {"img", "label", "soft_label"}
    # The batch the student was fed is the first batch of the plain reader (same seed, same order) ...
    mnist_data = _mnist_data()
    dataset = mnist_data.load_idx_dir(MNIST_DIR).subset(TRAIN, TEST).hold_out(VAL)
    first = next(mnist_data.sample_list_reader(dataset.train_images, dataset.train_labels, 64, SEED)())
    np.testing.assert_array_equal(fed["img"], np.stack([s[0] for s in first]))
    np.testing.assert_array_equal(fed["label"], np.stack([s[1] for s in first]))
    # ... and each sample carries the served teacher's prediction for that very sample.
    local = _local_teacher(workdir, fed["img"][:16])
    assert fed["soft_label"].shape == (64, 10)
    np.testing.assert_allclose(fed["soft_label"][:16], local, atol=1e-5)
    np.testing.assert_allclose(fed["soft_label"].sum(axis=1), 1.0, atol=1e-4)
    assert not np.allclose(fed["soft_label"][0], fed["soft_label"][1])


def test_few_labels_setting_feeds_soft_labels_for_every_image_and_labels_for_the_labelled_part(flow):
    """Setting b: the distilled student sees all training images (the transfer set) with the teacher's soft labels,
    and a label only for the first --labelled_samples of them; the others carry IGNORE_LABEL (-100)."""
    workdir, results, _ = flow
    fed = np.load(os.path.join(workdir, f"soft_labels_b_seed{SEED}.npz"))
    mnist_data = _mnist_data()
    dataset = mnist_data.load_idx_dir(MNIST_DIR).subset(TRAIN, TEST).hold_out(VAL)
    labels = dataset.train_labels.copy()
    labels[LABELLED:] = -100
    first = next(mnist_data.sample_list_reader(dataset.train_images, labels, 64, SEED)())
    np.testing.assert_array_equal(fed["img"], np.stack([s[0] for s in first]))
    np.testing.assert_array_equal(fed["label"], np.stack([s[1] for s in first]))
    ignored = int((fed["label"] == -100).sum())
    assert 0 < ignored < 64, fed["label"]
    np.testing.assert_allclose(fed["soft_label"][:16], _local_teacher(workdir, fed["img"][:16]), atol=1e-5)
    (student,) = results["students"]
    alone, distilled = student["b"]["alone"], student["b"]["distilled"]
    assert alone["labelled_images"] == distilled["labelled_images"] == LABELLED
    assert distilled["train_images"] == TRAIN - VAL
    # Same number of steps: the labelled part alone is drawn as often as the whole set.
    assert len(alone["step_losses"]) == len(distilled["step_losses"]) == 3 * 22  # 3 epochs x ceil(1400 / 64)


def test_training_loss_falls_and_students_learn(flow):
    _, results, _ = flow
    # Fashion-MNIST is harder than MNIST: 3 teacher epochs on 1,400 images reach ~0.78 (chance is 0.1).
    assert results["teacher"]["test_acc"] > 0.72
    (student,) = results["students"]
    assert set(student) == {"seed", "a", "b"}
    assert results["args"]["distill_temperature"] == 2.0 and results["args"]["hard_label_weight"] == 0.5
    for setting in ("a", "b"):
        for kind in ("alone", "distilled"):
            run = student[setting][kind]
            losses, hard = run["step_losses"], run["step_hard_losses"]
            assert len(losses) == len(hard) == 3 * 22  # 3 epochs x ceil(1400 / 64) steps
            # The distilled loss holds the softened targets' entropy, which training cannot remove: it falls less.
            factor = 0.6 if kind == "alone" else 0.8
            assert np.mean(losses[-10:]) < factor * np.mean(losses[:5]), (setting, kind, losses[:5], losses[-10:])
            assert np.mean(hard[-10:]) < 0.6 * np.mean(hard[:5]), (setting, kind, hard[:5], hard[-10:])
            assert run["test_acc"] > 0.55, (setting, kind, run["test_acc"])
            assert run["samples_per_s"] > 0
            assert run["distill"] == (kind == "distilled")
            assert run["val_images"] == VAL and run["test_images"] == TEST
            assert 1 <= run["best_val_epoch"] <= 3  # model selection on the validation set
            assert run["test_acc_at_best_val"] == run["epochs"][run["best_val_epoch"] - 1]["test_acc"]
            assert f"({MNIST_DIR})" in run["data"], run["data"]  # the folder the test chose, named in the results


def test_server_stopped_and_report_written(flow):
    workdir, results, out = flow
    server = results["server"]
    assert server["stopped"] is True
    assert not pid_alive(server["pid"])
    assert not port_is_open(int(server["endpoint"].rsplit(":", 1)[1]))
    with open(os.path.join(workdir, "results.md")) as f:
        table = f.read()
    assert table.strip() in out  # printed and written, the same text
    (student,) = results["students"]
    for setting, name in (("a", "all labels"), ("b", "few labels + transfer set")):
        gain = 100 * (student[setting]["distilled"]["test_acc_at_best_val"]
                      - student[setting]["alone"]["test_acc_at_best_val"])
        assert f"| ({setting}) {name} | distilled (DistillReader) | " in table
        assert f"| {gain:+.2f} |" in table, (gain, table)  # the gain in points, as computed from the runs
    assert f"{TRAIN - VAL} training images, the first {TRAIN} of the training set" in table
    assert "Fashion-MNIST" in table or "MNIST" in table
    with open(os.path.join(workdir, "accuracy.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_two_fleet_trainers_distill_from_a_served_teacher(flow, tmp_path):
    import paddle

    if int(paddle.__version__.split(".")[0]) >= 3:
        pytest.skip(f"paddle {paddle.__version__} has no CPU allreduce for static programs: c_allreduce_sum is gone "
                    "and its all_reduce op finds no gloo communicator ('NCCLCommContext is nullptr') after "
                    "init_parallel_env, so two CPU trainers cannot average gradients")
    workdir, _, _ = flow
    port = free_port()
    with ProcessGuard() as guard:
        server = guard.python("-m", "teachers.serve", "--model", os.path.join(workdir, "mnist_model"),
                              "--port", str(port), "--host", "127.0.0.1", "--thread", "1", env=_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: port_is_open(port), 60, "teacher port")
        launch = guard.python(
            "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir", str(tmp_path / "log"),
            os.path.join(EXAMPLE, "train_with_fleet.py"), "--use_distill_service", "True",
            "--distill_teachers", f"127.0.0.1:{port}", "--serving_conf_dir", os.path.join(workdir, "serving_client"),
            "--data_dir", MNIST_DIR, "--train_samples", "1024", "--test_samples", "300", "--epochs", "2",
            "--no_progress", env=_env(), cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        out, _ = launch.communicate(timeout=90)
        assert launch.returncode == 0, out.decode(errors="replace")[-3000:]
        assert server.poll() is None
    logs = [open(tmp_path / "log" / f"workerlog.{rank}").read() for rank in (0, 1)]
    finals = []
    for rank, log in enumerate(logs):
        assert f"training shard {rank}/2" in log
        finals.append([line.split("test acc ")[1].split(",")[0] for line in log.splitlines()
                       if f"[trainer {rank}] student epoch 2:" in line])
    # Gradients are averaged across the trainers: both hold the same parameters, hence the same test accuracy.
    assert finals[0] and finals[0] == finals[1], finals


def test_student_finds_a_registered_teacher_in_zookeeper(flow, zookeeper, zk_root, tmp_path):
    """README section 4: teachers.serve + discovery.register, student with --discovery_servers."""
    workdir, _, _ = flow
    port = free_port()
    with ProcessGuard() as guard:
        guard.python("-m", "teachers.serve", "--model", os.path.join(workdir, "mnist_model"), "--port", str(port),
                     "--host", "127.0.0.1", "--thread", "1", env=_env(), stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL)
        guard.python("-m", "discovery.register", "--zk", zookeeper.hosts, "--service", "MnistDistill",
                     "--root", zk_root, "--endpoint", f"127.0.0.1:{port}",
                     env=dict(_env(), DISTILL_ZK_AUTH="teacher:secret"), stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL)
        dump = tmp_path / "fed.npz"
        student = guard.python(
            os.path.join(EXAMPLE, "train_with_fleet.py"), "--use_distill_service", "True",
            "--discovery_servers", zookeeper.hosts, "--teacher_service_name", "MnistDistill",
            "--discovery_root", zk_root, "--serving_conf_dir", os.path.join(workdir, "serving_client"),
            "--data_dir", MNIST_DIR, "--train_samples", "640", "--test_samples", "200", "--epochs", "1",
            "--dump_soft_labels", str(dump), "--no_progress", env=_env(), cwd=str(tmp_path),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        out, _ = student.communicate(timeout=90)
        assert student.returncode == 0, out.decode(errors="replace")[-3000:]
    assert b"The classification accuracy is" in out
    fed = np.load(dump)
    np.testing.assert_allclose(fed["soft_label"][:8], _local_teacher(workdir, fed["img"][:8]), atol=1e-5)


def test_softened_distillation_loss_matches_hinton_recipe():
    """models.distill_loss on served probabilities equals T**2 * CE(softmax(z_t / T), softmax(z_s / T)) from the
    teacher's logits; at T = 1 it is the seed's soft-label cross entropy on the student's softmax."""
    import paddle

    sys.path.insert(0, EXAMPLE)
    try:
        import models
    finally:
        sys.path.remove(EXAMPLE)
    rng = np.random.RandomState(0)
    teacher_logits = (rng.randn(8, 10) * 6).astype(np.float32)
    teacher_logits[0, 3] = 120.0  # a confident answer: the other probabilities underflow to 0 in float32
    student_logits = rng.randn(8, 10).astype(np.float32)

    def softmax(z):
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    served = softmax(teacher_logits.astype(np.float64)).astype(np.float32)
    assert (served[0] == 0).sum() == 9
    paddle.enable_static()
    try:
        for temperature in (1.0, 2.0, 4.0):
            main, startup = paddle.static.Program(), paddle.static.Program()
            with paddle.static.program_guard(main, startup):
                logits = paddle.static.data("logits", [None, 10], "float32")
                soft = paddle.static.data("soft", [None, 10], "float32")
                loss = models.distill_loss(logits, paddle.nn.functional.softmax(logits), soft, temperature)
            exe = paddle.static.Executor(paddle.CPUPlace())
            (got,) = exe.run(main, feed={"logits": student_logits, "soft": served}, fetch_list=[loss])
            target = softmax(teacher_logits.astype(np.float64) / temperature)  # from logits, not probabilities
            log_q = np.log(softmax(student_logits.astype(np.float64) / temperature))
            want = temperature ** 2 * np.mean(-(target * log_q).sum(1))
            np.testing.assert_allclose(float(got), want, rtol=1e-4)
    finally:
        paddle.disable_static()
