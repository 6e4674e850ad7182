"""Text-classification distillation through DistillReader, on an offline corpus (Debian's fortunes).

1. read the corpus: one class per fortune file (``data.py``), word ids of any length;
2. train the CNN teacher (``models.py``): over a LoD input on paddle 2.x, over padded input + a ``length`` feed on
   paddle 3 (PIR has no LoD tensors; ``--teacher`` picks either on 2.x), export it and serve it with
   ``python -m teachers.serve`` on a free port of 127.0.0.1;
3. for every seed: train the bag-of-words student alone, then distilled from the served teacher through
   ``DistillReader.set_batch_generator`` (the ``words`` slot is a list of ragged id arrays: sent as a LoD feed,
   or padded with ``pad_value`` by the reader's workers, which fill ``length`` through ``lengths_feeds``; the
   teacher's ``logits`` come back per sample) with a KL-divergence loss, same epochs, same data order;
4. stop the server (always), write ``results.json``, ``results.md`` (mean and std over the seeds),
   ``results.png`` (test accuracy per epoch) and ``first_distilled_batch.npz`` (the first batch fed to a distilled
   student: words, labels, teacher logits).

Example::

    python examples/text/run.py --seeds 1,2,3 --workdir out/text_example
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
import statistics
import subprocess
import sys
import time

import numpy as np  # (numpy before paddle)

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [HERE, REPO_ROOT]

import data  # noqa: E402
import models  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--categories", default=",".join(data.DEFAULT_CATEGORIES),
                   help="comma-separated fortune files, one class each (default: %(default)s)")
    p.add_argument("--fortunes_dir", default=data.FORTUNES_DIR, help="folder of the fortune files")
    p.add_argument("--limit_per_category", type=int, default=0, help="at most N texts per class (0 = all)")
    p.add_argument("--teacher", choices=("auto", "lod", "padded"), default="auto",
                   help="teacher input: 'lod' (LoD tensor, paddle 2.x only), 'padded' (padded ids + length feed, "
                        "paddle 2.6 and 3.x) or 'auto' (lod on paddle 2.x, padded on paddle 3) (default: %(default)s)")
    p.add_argument("--seeds", default="1,2,3", help="comma-separated student seeds (teacher: the first)")
    p.add_argument("--epochs", type=int, default=8, help="student epochs (alone and distilled)")
    p.add_argument("--teacher_epochs", type=int, default=4, help="teacher epochs")
    p.add_argument("--batch_size", type=int, default=64, help="students' batch size")
    p.add_argument("--learning_rate", type=float, default=0.005, help="students' Adam learning rate")
    p.add_argument("--teacher_batch_size", type=int, default=32, help="samples per teacher request")
    p.add_argument("--temperature", type=float, default=4.0, help="soft-target temperature T")
    p.add_argument("--hard_label_weight", type=float, default=0.3,
                   help="weight of the hard-label loss; the distillation loss gets 1 minus it")
    p.add_argument("--workdir", default=os.path.join(REPO_ROOT, "out", "text_example"),
                   help="folder for the teacher, the server log and the results")
    p.add_argument("--server_timeout", type=float, default=120.0, help="seconds to wait for the teacher server")
    args = p.parse_args(argv)
    args.teacher = resolve_teacher(args.teacher, p.error)
    return args


def paddle_major() -> int:
    """The installed paddle's major version."""
    import paddle

    return int(paddle.__version__.split(".")[0])


def resolve_teacher(choice: str, error) -> str:
    """``auto`` -> ``lod`` on paddle 2.x, ``padded`` on paddle 3; ``lod`` on paddle 3 is an ``error`` (exit 2)."""
    major = paddle_major()
    if choice == "auto":
        return "lod" if major < 3 else "padded"
    if choice == "lod" and major >= 3:
        error(f"--teacher lod needs paddle 2.x: paddle {major}'s programs (PIR) have no LoD tensors. Use "
              f"--teacher padded (the default on paddle 3): padded ids with a length feed")
    return choice


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG


class ServedTeacher:
    """``python -m teachers.serve`` for the exported teacher; stopped (SIGTERM, then SIGKILL) on exit."""

    def __init__(self, server_dir: str, log_path: str):
        self.endpoint = f"127.0.0.1:{_free_port()}"
        self.cmd = [sys.executable, "-m", "teachers.serve", "--model", server_dir, "--host", "127.0.0.1",
                    "--port", self.endpoint.rsplit(":", 1)[1], "--thread", "1"]
        self.log_path = log_path
        self.proc = None

    def __enter__(self) -> ServedTeacher:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH")) if p))
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        return self

    def wait_ready(self, client_conf: str, timeout: float) -> None:
        from distill_reader.client import TeacherClient

        deadline = time.monotonic() + timeout
        with TeacherClient(self.endpoint, client_conf) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"teacher server exited with {self.proc.returncode}; see {self.log_path}")
                if client.health(timeout=0.5):
                    return
                time.sleep(0.1)
        raise RuntimeError(f"teacher server {self.endpoint} not healthy after {timeout:.0f}s; see {self.log_path}")

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def epoch_batches(corpus: data.Corpus, seed: int, batch_size: int):
    """``batches(epoch)``: (list of id arrays, labels) in a seeded order per epoch (same for both students)."""
    def batches(epoch: int):
        order = np.random.default_rng(seed * 1000 + epoch).permutation(len(corpus.train_ids))
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            yield [corpus.train_ids[i] for i in idx], corpus.train_labels[idx]
    return batches


def distilled_batches(corpus, seed, args, endpoint: str, client_conf: str):
    from distill_reader import DistillReader

    padding = {"pad_value": data.PAD, "lengths_feeds": {"words": "length"}} if args.teacher == "padded" else {}
    reader = DistillReader(ins=["words", "label"], predicts=["logits"], **padding)
    reader.set_fixed_teacher(endpoint)
    reader.set_serving_conf_file(client_conf)
    reader.set_teacher_batch_size(args.teacher_batch_size)
    plain = epoch_batches(corpus, seed, args.batch_size)
    return reader, (lambda epoch: reader.set_batch_generator(lambda: plain(epoch))())


def recording_first_batch(batches, path: str):
    """``batches`` that also writes its first distilled batch to ``path`` (npz, no pickle: the words as rows +
    offsets, the labels and the teacher's logits as fed), so the fed soft labels can be checked against a local
    run of the exported teacher."""
    def wrapped(epoch: int):
        for batch in batches(epoch):
            if not os.path.exists(path):
                words = [np.asarray(w, np.int64) for w in batch[0]]
                np.savez(path, rows=np.concatenate(words), offsets=np.cumsum([0] + [len(w) for w in words]),
                         labels=np.asarray(batch[1]), logits=np.asarray(batch[2]))
            yield batch
    return wrapped


def summarize(curves: list[list[float]]) -> dict:
    finals = [c[-1] for c in curves]
    return {"final_mean": statistics.mean(finals), "final_std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
            "finals": finals, "curves": curves}


def write_results(results: dict, workdir: str) -> None:
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    alone, distilled = results["alone"], results["distilled"]
    rows = ["| model | test accuracy (mean ± std over seeds " + results["seeds"] + ") |", "|---|---|",
            f"| teacher (CNN, {results['teacher']} input, paddle {results['paddle']}, seed "
            f"{results['seeds'].split(',')[0]}) | {results['teacher_accuracy']:.4f} |",
            f"| student alone (BOW) | {alone['final_mean']:.4f} ± {alone['final_std']:.4f} |",
            f"| student distilled through DistillReader | {distilled['final_mean']:.4f} ± "
            f"{distilled['final_std']:.4f} |"]
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write("\n".join(rows) + "\n")
    print("\n".join(rows), flush=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, color in (("alone", "tab:blue"), ("distilled", "tab:orange")):
        curves = np.array(results[name]["curves"])
        epochs = np.arange(1, curves.shape[1] + 1)
        mean, std = curves.mean(0), curves.std(0)
        ax.plot(epochs, mean, color=color, label=f"student {name}")
        ax.fill_between(epochs, mean - std, mean + std, color=color, alpha=0.2)
    ax.axhline(results["teacher_accuracy"], color="gray", linestyle="--", label="teacher")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"fortunes, {len(results['categories'])} classes, seeds {results['seeds']} (mean ± std)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "results.png"), dpi=100)


def run(args: argparse.Namespace) -> dict:
    from teachers.export import inference_model_to_serving

    started = time.monotonic()
    seeds = [int(s) for s in args.seeds.split(",")]
    os.makedirs(args.workdir, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(args.workdir, "first_distilled_batch.npz"))   # from an earlier run
    corpus = data.load_corpus(tuple(args.categories.split(",")), args.fortunes_dir,
                              limit_per_category=args.limit_per_category)
    print(f"[text] {len(corpus.train_ids)} training / {len(corpus.test_ids)} test texts, {len(corpus.categories)} "
          f"classes, vocabulary {corpus.vocab_size}", flush=True)
    teacher_dir = os.path.join(args.workdir, "teacher_inference")
    train = models.train_teacher if args.teacher == "lod" else models.train_padded_teacher
    teacher_accuracy = train(corpus, teacher_dir, args.teacher_epochs, seeds[0])
    server_dir, client_dir = (os.path.join(args.workdir, d) for d in ("serving_server", "serving_client"))
    inference_model_to_serving(teacher_dir, server_dir, client_dir, fetch_alias_names="logits,prediction")
    client_conf = os.path.join(client_dir, "serving_client_conf.prototxt")
    print(f"[text] {args.teacher} teacher test accuracy {teacher_accuracy:.4f}", flush=True)
    import paddle

    results = {"categories": list(corpus.categories), "seeds": args.seeds, "teacher_accuracy": teacher_accuracy,
               "teacher": args.teacher, "paddle": paddle.__version__,
               "train_texts": len(corpus.train_ids), "test_texts": len(corpus.test_ids), "args": vars(args)}
    alone, distilled = [], []
    with ServedTeacher(server_dir, os.path.join(args.workdir, "teacher_server.log")) as server:
        server.wait_ready(client_conf, args.server_timeout)
        results["server_pid"] = server.proc.pid
        for seed in seeds:
            alone.append(models.train_student(corpus, seed, args.epochs, epoch_batches(corpus, seed, args.batch_size),
                                              args.learning_rate))
            reader, batches = distilled_batches(corpus, seed, args, server.endpoint, client_conf)
            batches = recording_first_batch(batches, os.path.join(args.workdir, "first_distilled_batch.npz"))
            try:
                distilled.append(models.train_student(corpus, seed, args.epochs, batches, args.learning_rate,
                                                      args.temperature, args.hard_label_weight))
            finally:
                reader.close()
            print(f"[text] seed {seed}: alone {alone[-1][-1]:.4f}, distilled {distilled[-1][-1]:.4f}", flush=True)
    results.update(alone=summarize(alone), distilled=summarize(distilled), seconds=time.monotonic() - started)
    write_results(results, args.workdir)
    print(f"[text] done in {results['seconds']:.0f}s; results in {args.workdir}", flush=True)
    return results


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))   # unwinds: the server stops
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
