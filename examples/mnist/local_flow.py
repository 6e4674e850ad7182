"""The whole service-distillation flow on one machine with a fixed local teacher (no ZooKeeper).

1. train the teacher CNN and save it as a serving model (``train_with_fleet.py --save_serving_model``),
2. serve it on a free port of 127.0.0.1 (``python -m teachers.serve``) and wait until it is healthy,
3. for every seed: train the student MLP alone, then with distillation (same epochs, same seed),
4. stop the server (always: also on failure, Ctrl-C or SIGTERM), print the results table and save a PNG plot.

Example::

    python examples/mnist/local_flow.py --epochs 10 --teacher_epochs 4 --seeds 1,2,3
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
import time
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(os.path.dirname(HERE))
TRAIN_SCRIPT = os.path.join(HERE, "train_with_fleet.py")
STUDENT_HIDDEN = 128  # models.STUDENT_HIDDEN (not imported: models imports paddle)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=10, help="student epochs (alone and distilled)")
    p.add_argument("--teacher_epochs", type=int, default=6, help="teacher epochs")
    p.add_argument("--batch_size", type=int, default=64, help="training batch size of the students")
    p.add_argument("--teacher_train_batch_size", type=int, default=128, help="training batch size of the teacher")
    p.add_argument("--learning_rate", type=float, default=0.002, help="students' peak Adam learning rate")
    p.add_argument("--teacher_learning_rate", type=float, default=0.003, help="teacher's peak Adam learning rate")
    p.add_argument("--lr_schedule", choices=["constant", "cosine"], default="cosine",
                   help="learning-rate schedule of teacher and students (see train_with_fleet.py)")
    p.add_argument("--student_hidden", type=int, default=STUDENT_HIDDEN, help="hidden units of the student MLP")
    p.add_argument("--seeds", default="1", help="comma-separated student seeds, e.g. 1,2,3 (teacher: first seed)")
    p.add_argument("--seed", type=int, default=None, help="a single seed (same as --seeds N)")
    p.add_argument("--data_dir", default=None, help="MNIST IDX folder (default: download, else Fashion-MNIST)")
    p.add_argument("--train_samples", type=int, default=0, help="only the first N training samples (0 = all)")
    p.add_argument("--test_samples", type=int, default=0, help="only the first N test samples (0 = all)")
    p.add_argument("--workdir", default=os.path.join(REPO_ROOT, "out", "mnist_example"),
                   help="folder for models, logs, metrics JSON and the plot")
    p.add_argument("--reuse_teacher", action="store_true",
                   help="serve the teacher already in --workdir instead of training a new one")
    p.add_argument("--port", type=int, default=0, help="teacher port on 127.0.0.1 (0 = a free port)")
    p.add_argument("--thread", type=int, default=2, help="teacher server threads (teachers.serve --thread)")
    p.add_argument("--teacher_batch_size", type=int, default=0,
                   help="samples per teacher request (0 = the student's batch size)")
    p.add_argument("--distill_temperature", type=float, default=2.0,
                   help="soft-target temperature T (see train_with_fleet.py; 1 with --hard_label_weight 0 = the "
                        "seed's loss)")
    p.add_argument("--hard_label_weight", type=float, default=0.5,
                   help="weight of the hard-label loss mixed with the distillation loss (see train_with_fleet.py)")
    p.add_argument("--server_timeout", type=float, default=120.0, help="seconds to wait for the teacher to be ready")
    p.add_argument("--plot", default="", help="PNG path of the accuracy plot (default: WORKDIR/accuracy.png)")
    p.add_argument("--no_progress", action="store_true", help="no tqdm progress bars in the training runs")
    args = p.parse_args(argv)
    args.seeds = [args.seed] if args.seed is not None else [int(s) for s in args.seeds.split(",") if s.strip()]
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
           "--metrics_out", metrics, *extra]
    if args.data_dir:
        cmd += ["--data_dir", args.data_dir]
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


def run(args: argparse.Namespace) -> dict:
    os.makedirs(args.workdir, exist_ok=True)
    model_dir = os.path.join(args.workdir, "mnist_model")
    conf_dir = os.path.join(args.workdir, "serving_conf")
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
                common = ["--model", "student", "--epochs", str(args.epochs), "--batch_size", str(args.batch_size),
                          "--learning_rate", str(args.learning_rate), "--student_hidden", str(args.student_hidden)]
                alone = run_training(args, f"student_alone_seed{seed}", common, seed)
                dump = ["--dump_soft_labels", os.path.join(args.workdir, f"soft_labels_seed{seed}.npz")]
                distilled = run_training(args, f"student_distilled_seed{seed}", [*common, *distill, *dump], seed)
                results["students"].append({"seed": seed, "alone": alone, "distilled": distilled})
    finally:
        signal.signal(signal.SIGTERM, previous)
        server.stop()
        results["server"]["stopped"] = server.proc is not None and server.proc.poll() is not None
    results["wall_seconds"] = time.monotonic() - started
    with open(os.path.join(args.workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print("\n" + results_table(results), flush=True)
    plot_curves(results, args.plot)
    print(f"[local_flow] plot: {args.plot}\n[local_flow] metrics: {args.workdir}/results.json "
          f"(total {results['wall_seconds']:.0f} s)", flush=True)
    return results


def _spread(values: list[float], digits: int = 4) -> str:
    """``mean ± stdev (min .., max ..)`` over seeds, or the single value."""
    def fmt(v: float) -> str:
        return f"{v:.{digits}f}"

    if len(values) == 1:
        return fmt(values[0])
    return (f"{fmt(statistics.mean(values))} ± {fmt(statistics.stdev(values))} "
            f"(min {fmt(min(values))}, max {fmt(max(values))})")


def results_table(results: dict) -> str:
    """A Markdown table: teacher, student alone, student distilled; accuracy and training samples/s."""
    teacher = results["teacher"]
    students = results["students"]
    seeds = ",".join(str(s["seed"]) for s in students)
    rows = [("teacher CNN", f"{len(teacher['epochs'])}", f"{teacher['test_acc']:.4f}",
             f"{teacher['samples_per_s']:.0f}")]
    for kind, label in (("alone", "student MLP alone (plain reader)"),
                        ("distilled", "student MLP distilled (DistillReader)")):
        accs = [s[kind]["test_acc"] for s in students]
        speeds = [s[kind]["samples_per_s"] for s in students]
        rows.append((label, f"{len(students[0][kind]['epochs'])}", _spread(accs), _spread(speeds, digits=0)))
    gain = [s["distilled"]["test_acc"] - s["alone"]["test_acc"] for s in students]
    ratio = [s["distilled"]["samples_per_s"] / s["alone"]["samples_per_s"] for s in students]
    subset = results["args"].get("train_samples")
    subset_note = f" (trained on the first {subset} training samples)" if subset else ""
    a = results["args"]
    recipe = (f"teacher: LeNet CNN, batch {a.get('teacher_train_batch_size')}, Adam {a.get('teacher_learning_rate')} "
              f"{a.get('lr_schedule')}; student: MLP 784-{a.get('student_hidden')}-10, batch {a.get('batch_size')}, "
              f"Adam {a.get('learning_rate')} {a.get('lr_schedule')}; distillation loss T = "
              f"{a.get('distill_temperature')}, hard-label weight {a.get('hard_label_weight')}")
    header = f"data: {teacher['data']}\n{recipe}\nstudent seeds: {seeds}{subset_note}\n\n"
    lines = ["| model | epochs | test accuracy | training samples/s |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    footer = (f"\ndistilled - alone accuracy: {_spread(gain)}\n"
              f"student samples/s, DistillReader / plain reader: {_spread(ratio, digits=2)}")
    return header + "\n".join(lines) + footer


def plot_curves(results: dict, path: str) -> None:
    """Left: test accuracy per epoch of teacher, student alone and student distilled (mean over seeds, band =
    min..max). Right: the students' training samples/s with the plain reader and with DistillReader."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bars) = plt.subplots(1, 2, figsize=(10, 4.8), dpi=120, gridspec_kw={"width_ratios": [2.4, 1]})
    teacher = results["teacher"]["epochs"]
    ax.plot([e["epoch"] for e in teacher], [100 * e["test_acc"] for e in teacher], "k--o", ms=4,
            label=f"teacher CNN ({100 * results['teacher']['test_acc']:.2f}%)")
    kinds = (("alone", "tab:blue", "student MLP alone"), ("distilled", "tab:orange", "student MLP distilled"))
    for kind, color, label in kinds:
        curves = [[100 * e["test_acc"] for e in s[kind]["epochs"]] for s in results["students"]]
        epochs = list(range(1, len(curves[0]) + 1))
        by_epoch = list(zip(*curves))
        mean = [statistics.mean(v) for v in by_epoch]
        ax.plot(epochs, mean, "-o", color=color, ms=4, label=f"{label} ({mean[-1]:.2f}%)")
        if len(curves) > 1:
            ax.fill_between(epochs, [min(v) for v in by_epoch], [max(v) for v in by_epoch], color=color, alpha=0.2)
    n = len(results["students"])
    ax.set_title(f"Test accuracy per epoch ({n} seed{'s, band = min..max' if n > 1 else ''})", fontsize=10)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=9)

    speeds = [statistics.mean(s[kind]["samples_per_s"] for s in results["students"]) for kind, _, _ in kinds]
    drawn = bars.bar(["plain reader", "DistillReader"], speeds, color=[c for _, c, _ in kinds], width=0.6)
    bars.bar_label(drawn, labels=[f"{v:,.0f}" for v in speeds], fontsize=9)
    bars.set_title("Student training speed", fontsize=10)
    bars.set_ylabel("samples/s (teacher on the same CPU)")
    bars.set_ylim(0, 1.15 * max(speeds))
    bars.grid(axis="y", alpha=0.3)
    data = results["teacher"]["data"].split(" (")[0]
    subset = results["args"].get("train_samples")
    note = f"; students trained on the first {subset} training samples" if subset else ""
    fig.text(0.01, 0.01, f"data: {data}{note}", fontsize=8, color="gray")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
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
