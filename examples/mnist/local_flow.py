"""The whole service-distillation flow on one machine with a fixed local teacher (no ZooKeeper), in two settings.

1. train the teacher CNN on the labelled training images and save it as a serving model
   (``train_with_fleet.py --save_serving_model``); the last --val_samples training images are held out for
   validation (model selection), the test set is only reported;
2. serve it on a free port of 127.0.0.1 (``python -m teachers.serve``) and wait until it is healthy;
3. for every seed, two settings, each a student trained alone and the same student distilled (same seed, epochs,
   optimizer and number of steps):
   (a) all labels: alone on the labelled images, distilled on the same images with the teacher's soft labels;
   (b) few labels + a transfer set: only the first --labelled_samples training images keep their labels; alone
       trains on those, distilled sees all training images with the teacher's soft labels (through DistillReader)
       and the labels of the labelled part;
4. stop the server (always: also on failure, Ctrl-C or SIGTERM), print the results table (also written to
   WORKDIR/results.md) and save a PNG plot.

Example::

    python examples/mnist/local_flow.py --seeds 1,2,3 --offline
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import textwrap
import time
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(os.path.dirname(HERE))
TRAIN_SCRIPT = os.path.join(HERE, "train_with_fleet.py")
STUDENT_HIDDEN = 128  # models.STUDENT_HIDDEN (not imported: models imports paddle)
SETTINGS = {"a": "all labels", "b": "few labels + transfer set"}


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every flag's default in --help."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    run = p.add_argument_group("what to run")
    run.add_argument("--seeds", default="1,2,3", help="comma-separated student seeds (teacher: the first seed)")
    run.add_argument("--seed", type=int, default=None, help="a single seed (same as --seeds N)")
    run.add_argument("--settings", default="a,b",
                     help="a = all labels, b = few labels + transfer set; 'a', 'b' or 'a,b'")
    run.add_argument("--workdir", default=os.path.join(REPO_ROOT, "out", "mnist_example"),
                     help="folder for models, logs, metrics JSON, results.md and the plot")
    run.add_argument("--plot", default="", help="PNG path of the plot (default: WORKDIR/accuracy.png)")
    run.add_argument("--reuse_teacher", action="store_true",
                     help="serve the teacher already in --workdir instead of training a new one")
    run.add_argument("--no_progress", action="store_true", help="no tqdm progress bars in the training runs")
    data = p.add_argument_group("data")
    data.add_argument("--data_dir", default=None,
                      help="MNIST IDX folder (default: cached or downloaded MNIST, else Debian's Fashion-MNIST)")
    data.add_argument("--offline", action="store_true",
                      help="never download (also DISTILL_OFFLINE=1): cached MNIST, else Fashion-MNIST")
    data.add_argument("--train_samples", type=int, default=0,
                      help="only the first N training images, for teacher and students (0 = all)")
    data.add_argument("--val_samples", type=int, default=5000,
                      help="the last N of those held out as the validation set (model selection; 0 = none)")
    data.add_argument("--test_samples", type=int, default=0, help="only the first N test images (0 = all)")
    data.add_argument("--labelled_samples", type=int, default=2000,
                      help="setting b: the first N training images keep their labels, the others only get the "
                           "teacher's soft labels")
    train = p.add_argument_group("training")
    train.add_argument("--epochs", type=int, default=5, help="student epochs (alone and distilled)")
    train.add_argument("--teacher_epochs", type=int, default=5, help="teacher epochs")
    train.add_argument("--batch_size", type=int, default=64, help="training batch size of the students")
    train.add_argument("--teacher_train_batch_size", type=int, default=128, help="training batch size of the teacher")
    train.add_argument("--learning_rate", type=float, default=0.002, help="students' peak Adam learning rate")
    train.add_argument("--teacher_learning_rate", type=float, default=0.003, help="teacher's peak Adam learning rate")
    train.add_argument("--lr_schedule", choices=["constant", "cosine"], default="cosine",
                       help="learning-rate schedule of teacher and students (see train_with_fleet.py)")
    train.add_argument("--student_hidden", type=int, default=STUDENT_HIDDEN, help="hidden units of the student MLP")
    train.add_argument("--distill_temperature", type=float, default=2.0,
                       help="soft-target temperature T (see train_with_fleet.py)")
    train.add_argument("--hard_label_weight", type=float, default=0.5,
                       help="weight of the hard-label loss mixed with the distillation loss (see train_with_fleet.py)")
    serve = p.add_argument_group("teacher server")
    serve.add_argument("--port", type=int, default=0, help="teacher port on 127.0.0.1 (0 = a free port)")
    serve.add_argument("--thread", type=int, default=2, help="teacher server threads (teachers.serve --thread)")
    serve.add_argument("--teacher_batch_size", type=int, default=0,
                       help="samples per teacher request (0 = the student's batch size)")
    serve.add_argument("--server_timeout", type=float, default=120.0,
                       help="seconds to wait for the teacher to be ready")
    args = p.parse_args(argv)
    args.seeds = [args.seed] if args.seed is not None else [int(s) for s in args.seeds.split(",") if s.strip()]
    args.settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    if not args.seeds or any(s not in SETTINGS for s in args.settings) or not args.settings:
        p.error(f"--seeds needs one seed or more; --settings takes {', '.join(SETTINGS)}")
    args.workdir = os.path.abspath(args.workdir)
    args.plot = args.plot or os.path.join(args.workdir, "accuracy.png")
    return args


def child_env() -> dict:
    """Environment of the training and serving processes: the repo importable, paddle's glog quiet."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH", "")) if p)
    env.setdefault("GLOG_minloglevel", "2")
    return env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the driver dies, even by SIGKILL (Linux prctl PR_SET_PDEATHSIG)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    except OSError:
        pass


class TeacherServer:
    """``python -m teachers.serve`` in its own session; ``stop()`` ends its whole process group.

    Example::

        with TeacherServer(model_dir, conf_dir, port, log_path) as server:
            server.wait_ready(timeout=60)
            ...   # use server.endpoint
    """

    def __init__(self, model_dir: str, conf_dir: str, port: int, log_path: str, thread: int = 2):
        self.model_dir, self.conf_dir, self.port, self.log_path = model_dir, conf_dir, port, log_path
        self.endpoint = f"127.0.0.1:{port}"
        self.cmd = [sys.executable, "-m", "teachers.serve", "--model", model_dir, "--port", str(port),
                    "--thread", str(thread), "--host", "127.0.0.1"]
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> TeacherServer:
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.cmd, env=child_env(), stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True, preexec_fn=_die_with_parent)
        return self

    def wait_ready(self, timeout: float) -> None:
        """Until the server answers the health check; RuntimeError with its log if it exits or times out."""
        from distill_reader.client import TeacherClient

        deadline = time.monotonic() + timeout
        client = TeacherClient(self.endpoint, self.conf_dir)
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"teacher server exited with code {self.proc.returncode}:\n{self.log_tail()}")
                try:
                    if client.health(timeout=1.0):
                        return
                except Exception:  # not listening yet
                    pass
                time.sleep(0.2)
        finally:
            client.close()
        raise RuntimeError(f"teacher server {self.endpoint} not healthy after {timeout:.0f}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return b"\n".join(f.read().splitlines()[-lines:]).decode(errors="replace")
        except OSError:
            return "(no log)"

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM to the server's process group, SIGKILL after ``grace`` seconds."""
        if self.proc is None:
            return
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            if self.proc.poll() is not None:
                break
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
        self._log.close()

    def __enter__(self) -> TeacherServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def run_training(args: argparse.Namespace, name: str, extra: list[str], seed: int) -> dict:
    """One train_with_fleet.py run in a subprocess; returns its metrics JSON."""
    metrics = os.path.join(args.workdir, f"{name}.json")
    cmd = [sys.executable, TRAIN_SCRIPT, "--seed", str(seed), "--lr_schedule", args.lr_schedule,
           "--metrics_out", metrics, "--val_samples", str(args.val_samples), *extra]
    if args.data_dir:
        cmd += ["--data_dir", args.data_dir]
    if args.offline:
        cmd.append("--offline")
    if args.train_samples:
        cmd += ["--train_samples", str(args.train_samples)]
    if args.test_samples:
        cmd += ["--test_samples", str(args.test_samples)]
    if args.no_progress:
        cmd.append("--no_progress")
    print(f"\n[local_flow] {name}: {' '.join(cmd[1:])}", flush=True)
    subprocess.run(cmd, env=child_env(), cwd=args.workdir, check=True, preexec_fn=_die_with_parent)
    with open(metrics) as f:
        return json.load(f)


def _stop_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through the finally blocks that stop the server


def train_students(args: argparse.Namespace, distill: list[str], seed: int) -> dict:
    """Both settings' students for one seed: ``{"a": {"alone": ..., "distilled": ...}, "b": {...}}``."""
    common = ["--model", "student", "--epochs", str(args.epochs), "--batch_size", str(args.batch_size),
              "--learning_rate", str(args.learning_rate), "--student_hidden", str(args.student_hidden)]
    few = ["--labelled_samples", str(args.labelled_samples)]
    runs: dict = {}
    for setting in args.settings:
        extra = few if setting == "b" else []
        dump = ["--dump_soft_labels", os.path.join(args.workdir, f"soft_labels_{setting}_seed{seed}.npz")]
        runs[setting] = {
            "alone": run_training(args, f"student_{setting}_alone_seed{seed}", [*common, *extra], seed),
            "distilled": run_training(args, f"student_{setting}_distilled_seed{seed}",
                                      [*common, *extra, *distill, *dump], seed)}
    return runs


def run(args: argparse.Namespace) -> dict:
    os.makedirs(args.workdir, exist_ok=True)
    model_dir = os.path.join(args.workdir, "mnist_model")
    conf_dir = os.path.join(args.workdir, "serving_client")
    started = time.monotonic()
    results: dict = {"args": {k: v for k, v in vars(args).items()}, "students": []}

    if args.reuse_teacher and os.path.isdir(model_dir):
        with open(os.path.join(args.workdir, "teacher.json")) as f:
            results["teacher"] = json.load(f)
    else:
        results["teacher"] = run_training(
            args, "teacher", ["--save_serving_model", "True", "--epochs", str(args.teacher_epochs),
                              "--batch_size", str(args.teacher_train_batch_size),
                              "--learning_rate", str(args.teacher_learning_rate),
                              "--serving_model_dir", model_dir, "--serving_conf_dir", conf_dir,
                              "--inference_model_dir", os.path.join(args.workdir, "teacher_inference")],
            args.seeds[0])

    if not args.data_dir and not args.offline and results["teacher"].get("data_name") != "MNIST":
        args.offline = True  # the teacher's run found no MNIST (download failed): the students don't try again
        print("[local_flow] no MNIST download for the students: the teacher's attempt failed", flush=True)
    port = args.port or free_port()
    server = TeacherServer(model_dir, conf_dir, port, os.path.join(args.workdir, "teacher_server.log"), args.thread)
    results["server"] = {"endpoint": server.endpoint, "cmd": server.cmd}
    previous = signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        with server:
            results["server"]["pid"] = server.proc.pid
            server.wait_ready(args.server_timeout)
            print(f"[local_flow] teacher serving on {server.endpoint} (pid {server.proc.pid})", flush=True)
            distill = ["--use_distill_service", "True", "--distill_teachers", server.endpoint,
                       "--serving_conf_dir", conf_dir, "--distill_temperature", str(args.distill_temperature),
                       "--hard_label_weight", str(args.hard_label_weight)]
            if args.teacher_batch_size:
                distill += ["--teacher_batch_size", str(args.teacher_batch_size)]
            for seed in args.seeds:
                results["students"].append({"seed": seed, **train_students(args, distill, seed)})
    finally:
        signal.signal(signal.SIGTERM, previous)
        server.stop()
        results["server"]["stopped"] = server.proc is not None and server.proc.poll() is not None
    results["wall_seconds"] = time.monotonic() - started
    with open(os.path.join(args.workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    table = results_table(results)
    with open(os.path.join(args.workdir, "results.md"), "w") as f:
        f.write(table + "\n")
    print("\n" + table, flush=True)
    plot_curves(results, args.plot)
    print(f"[local_flow] table: {args.workdir}/results.md\n[local_flow] plot: {args.plot}\n[local_flow] metrics: "
          f"{args.workdir}/results.json (total {results['wall_seconds']:.0f} s)", flush=True)
    return results


def selected_acc(run: dict) -> float:
    """The reported test accuracy: at the epoch with the best validation accuracy (the last without one)."""
    return run.get("test_acc_at_best_val", run["test_acc"])


def _pm(values: list[float], scale: float = 100.0, digits: int = 2, sign: str = "") -> str:
    """``mean ± sample std`` of ``values * scale``, or the single value."""
    v = [scale * x for x in values]
    if len(v) == 1:
        return f"{v[0]:{sign}.{digits}f}"
    return f"{statistics.mean(v):{sign}.{digits}f} ± {statistics.stdev(v):.{digits}f}"


def gains(results: dict, setting: str) -> list[float]:
    """Distilled minus alone, per seed, in accuracy (fraction)."""
    return [selected_acc(s[setting]["distilled"]) - selected_acc(s[setting]["alone"]) for s in results["students"]]


def data_line(results: dict) -> str:
    """What data the runs used, from the runs themselves (name, source, image counts)."""
    teacher = results["teacher"]
    a = results["args"]
    subset = f", the first {a['train_samples']} of the training set" if a.get("train_samples") else ""
    return (f"data: {teacher['data']}. Used: {teacher.get('train_images')} "
            f"training images{subset}; {teacher.get('val_images', 0)} validation (the last of the training set, "
            f"for model selection); {teacher.get('test_images')} test (only reported)")


def results_table(results: dict) -> str:
    """The Markdown report: data, recipe, one row per setting and student, gains in points over seeds."""
    teacher, students, a = results["teacher"], results["students"], results["args"]
    seeds = ", ".join(str(s["seed"]) for s in students)
    first = students[0]
    lines = [data_line(results),
             f"teacher: LeNet CNN, {teacher.get('labelled_images', teacher.get('train_images'))} labelled images, "
             f"{len(teacher['epochs'])} epochs, batch {a.get('teacher_train_batch_size')}, Adam "
             f"{a.get('teacher_learning_rate')} {a.get('lr_schedule')}: test accuracy "
             f"{100 * teacher['test_acc']:.2f} %" + (f" (validation {100 * teacher['epochs'][-1]['val_acc']:.2f} %)"
                                                   if "val_acc" in teacher["epochs"][-1] else ""),
             f"students: MLP 784-{a.get('student_hidden')}-10, {a.get('epochs')} epochs, batch {a.get('batch_size')}, "
             f"Adam {a.get('learning_rate')} {a.get('lr_schedule')}; distilled: loss = {a.get('hard_label_weight')} "
             f"label CE + {1 - a.get('hard_label_weight'):g} T^2 soft CE, T = {a.get('distill_temperature')}; "
             "alone and distilled take the same number of steps",
             "test accuracy: of the epoch with the best validation accuracy; mean ± sample std over seeds "
             f"{seeds}; gain = distilled - alone per seed, in points",
             "",
             "| setting | student | labels / images trained on | test accuracy (%) | gain (points) | samples/s |",
             "|---|---|---|---|---|---|"]
    for setting in [k for k in SETTINGS if k in first]:
        for kind, label in (("alone", "alone (plain reader)"), ("distilled", "distilled (DistillReader)")):
            run0 = first[setting][kind]
            seen = run0["train_images"] if kind == "distilled" or setting == "a" else run0["labelled_images"]
            accs = [selected_acc(s[setting][kind]) for s in students]
            speed = statistics.mean(s[setting][kind]["samples_per_s"] for s in students)
            gain = _pm(gains(results, setting), sign="+") if kind == "distilled" else ""
            lines.append(f"| ({setting}) {SETTINGS[setting]} | {label} | {run0['labelled_images']} / {seen} | "
                         f"{_pm(accs)} | {gain} | {speed:.0f} |")
    lines.append("")
    for setting in [k for k in SETTINGS if k in first]:
        per_seed = ", ".join(f"seed {s['seed']}: {100 * selected_acc(s[setting]['alone']):.2f} / "
                             f"{100 * selected_acc(s[setting]['distilled']):.2f}" for s in students)
        lines.append(f"({setting}) alone / distilled per seed: {per_seed}")
    return "\n".join(lines)


def plot_curves(results: dict, path: str) -> None:
    """One panel per setting: test accuracy per epoch of the students alone and distilled (mean over seeds, band =
    min..max) and the teacher's; a last panel: each seed's reported accuracy, per setting and student."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    students = results["students"]
    settings = [k for k in SETTINGS if k in students[0]]
    fig, axes = plt.subplots(1, len(settings) + 1, figsize=(5 * len(settings) + 4, 4.8), dpi=110)
    teacher_acc = 100 * results["teacher"]["test_acc"]
    kinds = (("alone", "tab:blue"), ("distilled", "tab:orange"))
    for ax, setting in zip(axes, settings):
        run0 = students[0][setting]
        for kind, color in kinds:
            curves = [[100 * e["test_acc"] for e in s[setting][kind]["epochs"]] for s in students]
            epochs = list(range(1, len(curves[0]) + 1))
            by_epoch = list(zip(*curves))
            mean = [statistics.mean(v) for v in by_epoch]
            images = run0[kind]["train_images"] if kind == "distilled" else run0[kind]["labelled_images"]
            label = f"{kind}: {run0[kind]['labelled_images']} labels / {images} images" if setting == "b" else kind
            ax.plot(epochs, mean, "-o", color=color, ms=4, label=label)
            if len(curves) > 1:
                ax.fill_between(epochs, [min(v) for v in by_epoch], [max(v) for v in by_epoch], color=color,
                                alpha=0.25)
        ax.axhline(teacher_acc, color="k", ls="--", lw=1, label=f"teacher CNN ({teacher_acc:.2f}%)")
        ax.set_title(f"({setting}) {SETTINGS[setting]}: gain {_pm(gains(results, setting), sign='+')} points",
                     fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_xticks(epochs)
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    dots = axes[-1]
    ticks = []
    for i, (setting, (kind, color)) in enumerate((s, k) for s in settings for k in kinds):
        accs = [100 * selected_acc(s[setting][kind]) for s in students]
        dots.scatter([i] * len(accs), accs, color=color, zorder=3, s=18)
        if len(accs) > 1:
            dots.errorbar([i + 0.15], [statistics.mean(accs)], yerr=[statistics.stdev(accs)], fmt="_", color="k",
                          capsize=3)
        ticks.append(f"({setting})\n{kind}")
    dots.set_xticks(range(len(ticks)))
    dots.set_xticklabels(ticks, fontsize=8)
    dots.set_title(f"each seed (dots), mean ± std ({len(students)} seeds)", fontsize=10)
    dots.set_ylabel("test accuracy (%), best-validation epoch")
    dots.grid(axis="y", alpha=0.3)
    fig.text(0.01, 0.01, "\n".join(textwrap.wrap(data_line(results), 200)), fontsize=7, color="dimgray")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> None:
    try:
        run(parse_args(argv))
    except KeyboardInterrupt:
        print("\n[local_flow] interrupted; teacher server stopped", file=sys.stderr, flush=True)
        sys.exit(130)
    except subprocess.CalledProcessError as exc:
        print(f"\n[local_flow] a step failed (exit code {exc.returncode}): {' '.join(exc.cmd)}\n"
              "[local_flow] teacher server stopped", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
