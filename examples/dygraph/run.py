"""A dygraph student distilled from a served teacher: paddle.io.DataLoader (shuffled) -> DistillReader -> KL loss.

On one machine, paddle 2.6 or 3.x, in about a minute on Fashion-MNIST (Debian's ``dataset-fashion-mnist``):

1. train a small CNN teacher in dygraph, ``paddle.jit.save`` it (paddle 3 writes PIR ``.json``, 2.6 ``.pdmodel``),
   export it for serving (``teachers.export``) and serve it (``python -m teachers.serve``) on a free port;
2. ``--mode service``: a dygraph MLP student reads a shuffled ``paddle.io.DataLoader`` through a DistillReader
   that appends the served teacher's logits to every batch; loss = hard-label CE + ``kl_div_loss``;
3. ``--mode offline``: the same, with ``set_offline_cache``: the first epoch asks the teacher and writes the
   knowledge cache, the next (shuffled again) read each sample's own logits from it, no request;
4. ``--mode in_process``: the same student with the saved teacher loaded in-process (``dist.load_teacher``);
5. a student alone (no teacher) for comparison. The server is stopped at the end, also on errors and Ctrl-C.

Every served or cached soft label is checked against the in-process teacher (``max_soft_label_error`` in the
results). Results go to ``<workdir>/results.json``.

Example::

    python examples/dygraph/run.py --modes service,offline,in_process --epochs 4
"""
from __future__ import annotations

import argparse
import gzip  # noqa: F401  (before paddle: paddle 2.6.2 exports zlib symbols)
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(os.path.dirname(HERE))
FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
MODES = ("alone", "service", "offline", "in_process")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default="service,offline,in_process",
                   help="comma-separated student runs besides 'alone' (default: %(default)s)")
    p.add_argument("--data_dir", default=FASHION_MNIST, help="MNIST-format IDX folder (default: %(default)s)")
    p.add_argument("--train_samples", type=int, default=6000, help="training images used (default: %(default)s)")
    p.add_argument("--test_samples", type=int, default=2000, help="test images used (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=4, help="student epochs (default: %(default)s)")
    p.add_argument("--teacher_epochs", type=int, default=3, help="teacher epochs (default: %(default)s)")
    p.add_argument("--batch_size", type=int, default=64, help="student batch size (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=4.0, help="KL temperature T (default: %(default)s)")
    p.add_argument("--kl_weight", type=float, default=0.7,
                   help="weight of kl_div_loss; the hard-label CE gets 1 - it (default: %(default)s)")
    p.add_argument("--seed", type=int, default=1, help="seed of teacher, students and shuffling (default: %(default)s)")
    p.add_argument("--workdir", default=os.path.join(REPO_ROOT, "out", "dygraph_example"),
                   help="models, knowledge cache, server log and results.json (default: %(default)s)")
    args = p.parse_args(argv)
    args.modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(args.modes) - set(MODES))
    if unknown:
        p.error(f"unknown --modes {unknown}; choose from {list(MODES[1:])}")
    return args


# -- data ------------------------------------------------------------------------------------------------------
def read_idx(path: str) -> np.ndarray:
    """An IDX file (optionally .gz) as a uint8 array."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    dims = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * dims).reshape(shape)


def load(data_dir: str, prefix: str, count: int) -> tuple[np.ndarray, np.ndarray]:
    def find(name: str) -> str:
        for candidate in (name + "-ubyte.gz", name + "-ubyte", name + ".idx3-ubyte", name + ".idx1-ubyte"):
            if os.path.exists(os.path.join(data_dir, candidate)):
                return os.path.join(data_dir, candidate)
        raise SystemExit(f"no {name} IDX file in {data_dir} (apt-get install dataset-fashion-mnist, or --data_dir)")

    images = read_idx(find(f"{prefix}-images-idx3"))[:count].astype(np.float32)[:, None] / 127.5 - 1.0
    labels = read_idx(find(f"{prefix}-labels-idx1"))[:count].astype(np.int64)
    return images, labels


def make_dataset(paddle, images: np.ndarray, labels: np.ndarray):
    class Images(paddle.io.Dataset):
        def __getitem__(self, i):
            return images[i], labels[i]

        def __len__(self):
            return len(images)

    return Images()


# -- models ----------------------------------------------------------------------------------------------------
def teacher_net(paddle):
    nn = paddle.nn
    return nn.Sequential(nn.Conv2D(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2D(2),
                         nn.Conv2D(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2D(2),
                         nn.Flatten(), nn.Linear(32 * 7 * 7, 10))


def student_net(paddle):
    nn = paddle.nn
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))


def accuracy(paddle, model, images: np.ndarray, labels: np.ndarray) -> float:
    model.eval()
    with paddle.no_grad():
        logits = model(paddle.to_tensor(images)).numpy()
    model.train()
    return float((logits.argmax(axis=1) == labels).mean())


def train_teacher(paddle, args, train, test) -> float:
    paddle.seed(args.seed)
    model = teacher_net(paddle)
    optimizer = paddle.optimizer.Adam(learning_rate=0.002, parameters=model.parameters())
    loader = paddle.io.DataLoader(make_dataset(paddle, *train), batch_size=128, shuffle=True)
    for _ in range(args.teacher_epochs):
        for images, labels in loader:
            loss = paddle.nn.functional.cross_entropy(model(images), labels)
            loss.backward()
            optimizer.step()
            optimizer.clear_grad()
    acc = accuracy(paddle, model, *test)
    model.eval()
    paddle.jit.save(model, os.path.join(args.workdir, "teacher", "inference"),
                    input_spec=[paddle.static.InputSpec([None, 1, 28, 28], "float32", "image")])
    return acc


# -- serving ---------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: str, conf_dir: str, log_path: str) -> tuple[subprocess.Popen, str]:
    """``python -m teachers.serve`` on a free port; returns (process, endpoint) once it answers health checks."""
    from distill_reader.client import TeacherClient

    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")])))
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "teachers.serve", "--model", model_dir, "--port", str(port),
                                 "--host", "127.0.0.1", "--thread", "2"], stdout=log, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
    endpoint = f"127.0.0.1:{port}"
    client = TeacherClient(endpoint, conf_dir)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"teacher server exited with {proc.returncode}; see {log_path}")
            try:
                if client.health(timeout=1.0):
                    return proc, endpoint
            except Exception:  # not listening yet
                pass
            time.sleep(0.2)
    finally:
        client.close()
    stop_server(proc)
    raise SystemExit(f"teacher server {endpoint} not healthy after 120 s; see {log_path}")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()


# -- students --------------------------------------------------------------------------------------------------
def train_student(paddle, args, mode: str, train, test, endpoint=None, conf_dir=None) -> dict:
    """One student run; returns accuracy, losses and, with a teacher, the largest soft-label error seen."""
    from distill_reader import DistillReader, dist

    paddle.seed(args.seed)
    model = student_net(paddle)
    optimizer = paddle.optimizer.Adam(learning_rate=0.003, parameters=model.parameters())
    loader = paddle.io.DataLoader(make_dataset(paddle, *train), batch_size=args.batch_size, shuffle=True)
    check = dist.load_teacher(os.path.join(args.workdir, "teacher", "inference"))   # the teacher, in-process
    reader, source, error, epochs = None, loader, 0.0, []
    if mode in ("service", "offline"):
        reader = DistillReader(ins=["image", "label"], predicts=["logits"])
        reader.set_fixed_teacher(endpoint)
        reader.set_serving_conf_file(conf_dir)
        if mode == "offline":
            reader.set_offline_cache(os.path.join(args.workdir, "knowledge_cache"))
        source = reader.set_batch_generator(loader)
    try:
        for _ in range(args.epochs):
            losses = []
            for batch in source():
                images, labels = batch[0], batch[1]
                logits = model(paddle.to_tensor(images))
                loss = paddle.nn.functional.cross_entropy(logits, paddle.to_tensor(labels))
                if mode != "alone":
                    teacher_logits = batch[2] if reader is not None else check(paddle.to_tensor(images))
                    expected = check(paddle.to_tensor(images)).numpy()
                    error = max(error, float(np.abs(np.asarray(teacher_logits) - expected).max()))
                    kl = dist.functional.kl_div_loss(logits, teacher_logits, temperature=args.temperature)
                    loss = (1 - args.kl_weight) * loss + args.kl_weight * kl
                loss.backward()
                optimizer.step()
                optimizer.clear_grad()
                losses.append(float(loss))
            stage = reader.last_epoch_stats.stage if reader is not None else {}
            epochs.append({"loss": float(np.mean(losses)), "requests": stage.get("requests", 0),
                           "cache": stage.get("cache"), "cache_served": stage.get("cache_served", 0)})
    finally:
        if reader is not None:
            reader.close()
    return {"mode": mode, "accuracy": accuracy(paddle, model, *test), "epochs": epochs,
            "max_soft_label_error": error if mode != "alone" else None}


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    import paddle

    from teachers.export import inference_model_to_serving

    paddle.disable_static()
    train = load(args.data_dir, "train", args.train_samples)
    test = load(args.data_dir, "t10k", args.test_samples)
    results = {"paddle": paddle.__version__, "teacher_accuracy": train_teacher(paddle, args, train, test),
               "students": []}
    server_dir, conf_dir = os.path.join(args.workdir, "serving_server"), os.path.join(args.workdir, "serving_client")
    inference_model_to_serving(os.path.join(args.workdir, "teacher"), server_dir, conf_dir, fetch_alias_names="logits")
    if os.path.exists(os.path.join(args.workdir, "knowledge_cache")):
        import shutil

        shutil.rmtree(os.path.join(args.workdir, "knowledge_cache"))   # written anew for this teacher
    server, endpoint = None, None
    try:
        if {"service", "offline"} & set(args.modes):
            server, endpoint = start_server(server_dir, conf_dir, os.path.join(args.workdir, "teacher_server.log"))
            results["server_pid"] = server.pid
        for mode in ["alone"] + args.modes:
            run = train_student(paddle, args, mode, train, test, endpoint, conf_dir)
            results["students"].append(run)
            print(f"{mode:>10}: accuracy {run['accuracy']:.4f}  last loss {run['epochs'][-1]['loss']:.4f}  "
                  f"requests/epoch {[e['requests'] for e in run['epochs']]}", flush=True)
    finally:
        if server is not None:
            stop_server(server)
    print(f"   teacher: accuracy {results['teacher_accuracy']:.4f} (paddle {paddle.__version__})")
    with open(os.path.join(args.workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
