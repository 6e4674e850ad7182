"""Train the MNIST teacher or student with fleet (static graph), optionally distilling through DistillReader.

The seed's three commands keep working:

    python train_with_fleet.py --save_serving_model                # teacher CNN -> mnist_model/ + serving_client/
    python -m teachers.serve --model mnist_model --thread 4 --port 9292
    python train_with_fleet.py --use_distill_service True --distill_teachers 127.0.0.1:9292   # student MLP

The student's loss: by default the seed's ``cross_entropy(prediction, soft_label, soft_label=True)`` on the served
softmax; ``--distill_temperature T --hard_label_weight w`` gives the usual soft-target recipe (models.distill_loss).

Several trainers: ``python -m paddle.distributed.launch --nproc_per_node 2 train_with_fleet.py ...``; each trainer
reads its shard of the training set through its own DistillReader and gradients are averaged every step.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

# A static-graph (legacy program) training script, like the seed's: on paddle 3 the flag must be set before paddle
# is imported, or paddle builds PIR programs, which paddle.static.nn and fleet's static optimizer do not support.
os.environ.setdefault("FLAGS_enable_pir_api", "0")

import data as mnist_data  # noqa: E402  (first: imports numpy and gzip before paddle)
import models  # noqa: E402
import numpy as np  # noqa: E402
import paddle  # noqa: E402
import paddle.distributed as dist  # noqa: E402
from paddle.distributed import fleet  # noqa: E402
from tqdm import tqdm  # noqa: E402

log = logging.getLogger("train_with_fleet")


def str2bool(value: str) -> bool:
    """'True'/'False' as in the seed (ast.literal_eval), also 1/0/yes/no."""
    lowered = str(value).strip().lower()
    if lowered in ("true", "1", "yes", "y"):
        return True
    if lowered in ("false", "0", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every flag's default in --help."""


IGNORE_LABEL = -100  # the label of a sample the student has no label for (cross_entropy's ignore_index)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    flag = dict(type=str2bool, nargs="?", const=True, default=False)
    model = p.add_argument_group("model and training")
    model.add_argument("--model", choices=["auto", "teacher", "student"], default="auto",
                       help="network to train: teacher (CNN) or student (small MLP); auto = teacher with "
                            "--save_serving_model, else student")
    model.add_argument("--student_hidden", type=int, default=models.STUDENT_HIDDEN,
                       help="hidden units of the student MLP")
    model.add_argument("--epochs", "--num_epochs", dest="epochs", type=int, default=5, help="training epochs")
    model.add_argument("--batch_size", type=int, default=64, help="samples per training step (per trainer)")
    model.add_argument("--seed", type=int, default=1, help="seed of weight init and of the per-epoch shuffle")
    model.add_argument("--learning_rate", type=float, default=0.001, help="Adam learning rate (peak with cosine)")
    model.add_argument("--lr_schedule", choices=["constant", "cosine"], default="constant",
                       help="constant = the seed's fixed Adam rate; cosine = decay from --learning_rate to 0 over "
                            "all training steps (local_flow.py uses cosine for teacher and students)")
    model.add_argument("--use_gpu", **flag,
                       help="train on GPU FLAGS_selected_gpus (needs the paddlepaddle-gpu wheel)")
    data = p.add_argument_group("data")
    data.add_argument("--data_dir", default=None,
                      help="folder with MNIST IDX files (train-*/t10k-*, .gz or plain; only t10k-* is split "
                           "8000/2000); default: MNIST cached in ~/.cache/paddle/dataset/mnist or downloaded once, "
                           "else Fashion-MNIST from /usr/share/datasets")
    data.add_argument("--offline", action="store_true",
                      help="never download (also DISTILL_OFFLINE=1): cached MNIST, else Fashion-MNIST")
    data.add_argument("--train_samples", type=int, default=0, help="use only the first N training samples (0 = all)")
    data.add_argument("--val_samples", type=int, default=0,
                      help="hold out the last N training samples (after --train_samples) as a validation set, "
                           "evaluated every epoch and never trained on (0 = none)")
    data.add_argument("--test_samples", type=int, default=0, help="use only the first N test samples (0 = all)")
    data.add_argument("--labelled_samples", type=int, default=0,
                      help="only the first N training samples keep their labels (0 = all). Alone, the student "
                           "trains on those N, for as many steps per epoch as the whole training set gives; with "
                           "--use_distill_service it sees every training sample with the teacher's soft label and "
                           "the label only for the first N (a transfer set)")
    teacher = p.add_argument_group("teacher side (--save_serving_model)")
    teacher.add_argument("--save_serving_model", **flag,
                         help="after training, save the model for teachers.serve (--serving_model_dir) and its "
                              "client config (--serving_conf_dir), like serving_io.save_model in the seed")
    teacher.add_argument("--serving_model_dir", default="mnist_model",
                         help="serving model folder written by the teacher")
    teacher.add_argument("--inference_model_dir", default="",
                         help="also save a Paddle inference model under this folder (model.pdmodel/.pdiparams)")
    student = p.add_argument_group("student side (--use_distill_service)")
    student.add_argument("--use_distill_service", **flag,
                         help="train with the teachers' soft labels fetched by DistillReader")
    student.add_argument("--distill_teachers", default="127.0.0.1:9292",
                         help="fixed teachers, 'host:port[,host:port...]' (ignored with --discovery_servers)")
    student.add_argument("--discovery_servers", default="",
                         help="ZooKeeper hosts 'host:port[,...]' to find teachers in instead of --distill_teachers")
    student.add_argument("--teacher_service_name", default="MnistDistill",
                         help="service name the teachers registered under (with --discovery_servers)")
    student.add_argument("--discovery_root", default="/distill",
                         help="ZooKeeper folder holding the services (with --discovery_servers; "
                              "discovery.register --root)")
    student.add_argument("--require_max_teacher", type=int, default=4,
                         help="use at most this many discovered teachers (with --discovery_servers)")
    student.add_argument("--serving_conf_dir", default="serving_client",
                         help="client config folder: written with --save_serving_model, read by DistillReader "
                              "(a folder named serving_conf, the former default, is read when this one is absent)")
    student.add_argument("--teacher_batch_size", type=int, default=0,
                         help="samples per teacher request (0 = --batch_size: one request per student batch)")
    student.add_argument("--distill_temperature", type=float, default=1.0,
                         help="softening temperature T of the distillation loss. 1 = the seed's loss, "
                              "cross_entropy(prediction, soft_label, soft_label=True). Above 1, Hinton's soft "
                              "targets: the served probabilities p are softened on the student side, "
                              "softmax(log(p) / T) (equal to softmax(teacher_logits / T)), against "
                              "softmax(student_logits / T), times T**2")
    student.add_argument("--hard_label_weight", type=float, default=0.0,
                         help="loss = w * CE(label) + (1 - w) * distill loss; 0 = the seed's pure distillation loss")
    output = p.add_argument_group("output")
    output.add_argument("--metrics_out", default="",
                        help="write per-epoch validation and test accuracy, step losses and samples/s to this JSON "
                             "file")
    output.add_argument("--dump_soft_labels", default="",
                        help="write the first training batch as fed (img, label, soft_label) to this .npz file")
    output.add_argument("--no_progress", action="store_true", help="no tqdm progress bars")
    args = p.parse_args(argv)
    if args.model == "auto":
        args.model = "teacher" if args.save_serving_model else "student"
    if not 0.0 <= args.hard_label_weight <= 1.0:
        p.error("--hard_label_weight must be within [0, 1]")
    if args.distill_temperature <= 0:
        p.error("--distill_temperature must be > 0")
    if args.labelled_samples < 0 or args.val_samples < 0:
        p.error("--labelled_samples and --val_samples must be >= 0")
    return args


def loss_label(args: argparse.Namespace) -> str:
    """What the progress bar's ``loss`` is, e.g. ``loss = 0.5 label CE + 0.5 T^2 soft CE (T=2)``."""
    if not args.use_distill_service:
        return "loss = label CE"
    w, t = args.hard_label_weight, args.distill_temperature
    soft = f"T^2 soft CE (T={t:g})" if t != 1 else "soft CE"
    return f"loss = {w:g} label CE + {1 - w:g} {soft}" if w else f"loss = {soft}"


def _allreduce_sum_op() -> dict:
    """The static sum-allreduce op of paddle 2.6 (``c_allreduce_sum``, gloo on CPU); a clear error elsewhere."""
    from paddle.base.framework import OpProtoHolder

    try:
        OpProtoHolder.instance().get_op_proto("c_allreduce_sum")
    except ValueError:
        raise SystemExit(f"paddle {paddle.__version__} has no CPU allreduce op for static programs (c_allreduce_sum "
                         "is gone; all_reduce needs NCCL): train with one CPU trainer, on GPUs, or with paddle "
                         "2.6") from None
    return {"type": "c_allreduce_sum", "x": "X", "out": "Out", "attrs": {"ring_id": 0, "use_calc_stream": True}}


class Network:
    """The programs and variables of one training run."""

    def __init__(self, args: argparse.Namespace, nranks: int, use_gpu: bool, total_steps: int = 1):
        self.main = paddle.static.Program()
        self.startup = paddle.static.Program()
        self.main.random_seed = self.startup.random_seed = args.seed
        with paddle.utils.unique_name.guard():
            self._build(args, nranks, use_gpu, total_steps)

    def _build(self, args: argparse.Namespace, nranks: int, use_gpu: bool, total_steps: int) -> None:
        with paddle.static.program_guard(self.main, self.startup):
            self.img = paddle.static.data("img", [None, 1, 28, 28], "float32")
            self.label = paddle.static.data("label", [None, 1], "int64")
            self.logits, self.prediction = models.build_model(args.model, self.img, args.student_hidden)
            # Samples without a label (IGNORE_LABEL, --labelled_samples with distillation) add 0: the mean is over
            # the whole batch, so a labelled sample weighs the same as in a fully labelled batch.
            self.hard_loss = paddle.mean(paddle.nn.functional.cross_entropy(
                self.prediction, self.label, use_softmax=False, ignore_index=IGNORE_LABEL, reduction="none"))
            self.test_program = self.main.clone(for_test=True)
        # Accuracy only in the test program: training batches may hold samples without labels (IGNORE_LABEL).
        with paddle.static.program_guard(self.test_program, paddle.static.Program()):
            block = self.test_program.global_block()
            self.acc = paddle.static.accuracy(input=block.var(self.prediction.name), label=block.var(self.label.name))
        with paddle.static.program_guard(self.main, self.startup):
            self.inputs = [self.img, self.label]
            if args.use_distill_service:
                # The teacher's prediction is one more input of the student (the seed's soft_label).
                self.soft_label = paddle.static.data("soft_label", [None, 10], "float32")
                self.inputs.append(self.soft_label)
                soft = models.distill_loss(self.logits, self.prediction, self.soft_label, args.distill_temperature)
                w = args.hard_label_weight
                self.loss = soft if w == 0 else w * self.hard_loss + (1 - w) * soft
            else:
                self.loss = self.hard_loss
            # With cosine, the training loop calls self.lr_scheduler.step() after every step.
            self.lr_scheduler = (paddle.optimizer.lr.CosineAnnealingDecay(args.learning_rate, max(1, total_steps))
                                 if args.lr_schedule == "cosine" else None)
            optimizer = paddle.optimizer.Adam(learning_rate=self.lr_scheduler or args.learning_rate)
            if nranks > 1 and use_gpu:
                optimizer = fleet.distributed_optimizer(optimizer, fleet.DistributedStrategy())
                optimizer.minimize(self.loss)
            elif nranks > 1:
                # fleet's static collective optimizer only sets up NCCL/BKCL communicators ("comm_id must be
                # generated in paddlepaddle-xpu"); on CPU average the gradients with gloo allreduce ops instead.
                params_grads = optimizer.backward(self.loss)
                block = self.main.global_block()
                allreduce = _allreduce_sum_op()
                for _, grad in params_grads:
                    block.append_op(type=allreduce["type"], inputs={allreduce["x"]: grad},
                                    outputs={allreduce["out"]: grad}, attrs=allreduce["attrs"])
                    block.append_op(type="scale", inputs={"X": grad}, outputs={"Out": grad},
                                    attrs={"scale": 1.0 / nranks})
                optimizer.apply_gradients(params_grads)
            else:
                optimizer.minimize(self.loss)


def conf_file(conf_dir: str) -> str:
    """The client config in ``conf_dir``; the former default folder ``serving_conf`` when ``serving_client`` (the
    default now, as teachers.export and Paddle Serving name it) does not exist."""
    if conf_dir == "serving_client" and not os.path.isdir(conf_dir) and os.path.isdir("serving_conf"):
        conf_dir = "serving_conf"
    return os.path.join(conf_dir, "serving_client_conf.prototxt")


def training_samples(args: argparse.Namespace, dataset: mnist_data.MnistData):
    """(images, labels, samples per epoch) the student's reader draws from, after --labelled_samples."""
    images, labels, n = dataset.train_images, dataset.train_labels, len(dataset.train_images)
    k = args.labelled_samples
    if not k or k >= n:
        return images, labels, n
    if args.use_distill_service:  # every image, its label only for the first k: the teacher labels the rest
        labels = labels.copy()
        labels[k:] = IGNORE_LABEL
        return images, labels, n
    return images[:k], labels[:k], n  # the labelled part alone, as many steps per epoch as the whole set


def make_train_reader(args: argparse.Namespace, dataset: mnist_data.MnistData):
    """The plain sample-list reader, wrapped in a DistillReader with --use_distill_service."""
    images, labels, per_epoch = training_samples(args, dataset)
    reader = mnist_data.sample_list_reader(images, labels, args.batch_size, args.seed, samples_per_epoch=per_epoch)
    if not args.use_distill_service:
        return reader, None
    from distill_reader import DistillReader

    dr = DistillReader(ins=["img", "label"], predicts=["prediction"])
    dr.set_serving_conf_file(conf_file(args.serving_conf_dir))
    dr.set_teacher_batch_size(args.teacher_batch_size or args.batch_size)
    if args.discovery_servers:
        dr.set_dynamic_teacher(args.discovery_servers, args.teacher_service_name, args.require_max_teacher,
                               root=args.discovery_root)
        log.info("teachers: service %r in ZooKeeper %s", args.teacher_service_name, args.discovery_servers)
    else:
        dr.set_fixed_teacher(args.distill_teachers)
        log.info("teachers: %s", args.distill_teachers)
    return dr.set_sample_list_generator(reader), dr


def evaluate(exe, net: Network, images: np.ndarray, labels: np.ndarray, batch_size: int = 500) -> tuple[float, float]:
    """(mean loss, accuracy) of the test program over ``images``."""
    correct, loss_sum = 0.0, 0.0
    n = len(images)
    for start in range(0, n, batch_size):
        img, label = images[start:start + batch_size], labels[start:start + batch_size]
        loss, acc = exe.run(net.test_program, feed={"img": img, "label": label}, fetch_list=[net.hard_loss, net.acc])
        correct += float(acc) * len(img)
        loss_sum += float(loss) * len(img)
    return loss_sum / n, correct / n


def save_models(args: argparse.Namespace, exe, net: Network) -> None:
    if args.inference_model_dir:
        prefix = os.path.join(args.inference_model_dir, "model")
        paddle.static.save_inference_model(prefix, [net.img], [net.prediction], exe, program=net.test_program)
        log.info("saved inference model %s.pdmodel", prefix)
    if args.save_serving_model:
        from teachers.export import save_model

        save_model(args.serving_model_dir, args.serving_conf_dir, {"img": net.img}, {"prediction": net.prediction},
                   net.test_program)
        print(f"save serving model {args.serving_model_dir}/ and client config {args.serving_conf_dir}/, "
              f"feed_names=['img'], fetch_names=['prediction']", flush=True)


def train(args: argparse.Namespace) -> dict:
    paddle.enable_static()
    fleet.init(is_collective=True)
    rank, nranks = fleet.worker_index(), fleet.worker_num()
    use_gpu = bool(args.use_gpu)
    if use_gpu and not paddle.is_compiled_with_cuda():
        log.warning("--use_gpu True but this paddle is the CPU build: training on CPU")
        use_gpu = False
    if nranks > 1 and not use_gpu:
        dist.init_parallel_env()  # gloo process group for the CPU allreduce ops
    place = paddle.CUDAPlace(int(os.getenv("FLAGS_selected_gpus", "0"))) if use_gpu else paddle.CPUPlace()

    dataset = mnist_data.load_data(args.data_dir, offline=args.offline or None)
    dataset = dataset.subset(args.train_samples, args.test_samples).hold_out(args.val_samples).shard(rank, nranks)
    print(f"[trainer {rank}/{nranks}] data: {dataset.source}", flush=True)
    n_val = 0 if dataset.val_images is None else len(dataset.val_images)
    labelled = min(args.labelled_samples or len(dataset.train_images), len(dataset.train_images))
    print(f"[trainer {rank}/{nranks}] {args.model}: {len(dataset.train_images)} training images, {labelled} of them "
          f"with labels; {n_val} validation, {len(dataset.test_images)} test", flush=True)

    steps_per_epoch = -(-len(dataset.train_images) // args.batch_size)
    net = Network(args, nranks, use_gpu, total_steps=steps_per_epoch * args.epochs)
    train_reader, distill_reader = make_train_reader(args, dataset)
    loader = paddle.base.io.DataLoader.from_generator(feed_list=net.inputs, capacity=64, iterable=True)
    loader.set_sample_list_generator(train_reader, places=place)

    exe = paddle.static.Executor(place)
    exe.run(net.startup)
    history: dict = {"model": args.model, "distill": bool(args.use_distill_service), "seed": args.seed,
                     "data": dataset.source, "data_name": dataset.name, "train_images": len(dataset.train_images),
                     "labelled_images": labelled, "val_images": n_val, "test_images": len(dataset.test_images),
                     "rank": rank, "nranks": nranks, "epochs": [], "step_losses": [],
                     "step_hard_losses": []}
    try:
        for epoch in range(args.epochs):
            start, samples = time.perf_counter(), 0
            bar = tqdm(loader(), total=steps_per_epoch,
                       desc=f"{args.model} epoch {epoch + 1}/{args.epochs} ({loss_label(args)})",
                       # None: tqdm stays quiet when stderr is not a terminal (logs, CI)
                       disable=True if args.no_progress or rank != 0 else None, file=sys.stderr,
                       dynamic_ncols=True)
            for step, feed in enumerate(bar):
                if step == 0 and epoch == 0 and args.dump_soft_labels and rank == 0:
                    np.savez(args.dump_soft_labels, **{k: np.array(v) for k, v in feed[0].items()})
                loss, hard_loss = exe.run(net.main, feed=feed, fetch_list=[net.loss, net.hard_loss])
                history["step_losses"].append(float(loss))
                history["step_hard_losses"].append(float(hard_loss))  # label cross entropy, whatever the loss
                if net.lr_scheduler is not None:
                    net.lr_scheduler.step()
                samples += np.array(feed[0]["img"]).shape[0]
                if step % 20 == 0:
                    bar.set_postfix({"loss": f"{float(loss):.4f}", "label CE": f"{float(hard_loss):.4f}"})
            elapsed = time.perf_counter() - start
            record = {"epoch": epoch + 1, "train_seconds": elapsed, "samples": samples,
                      "samples_per_s": samples / elapsed}
            if n_val:
                record["val_loss"], record["val_acc"] = evaluate(exe, net, dataset.val_images, dataset.val_labels)
            record["test_loss"], record["test_acc"] = evaluate(exe, net, dataset.test_images, dataset.test_labels)
            history["epochs"].append(record)
            val = f"val acc {record['val_acc']:.4f}, " if n_val else ""
            print(f"[trainer {rank}] {args.model} epoch {epoch + 1}: {val}test acc {record['test_acc']:.4f}, test "
                  f"loss {record['test_loss']:.4f}, {samples / elapsed:.0f} samples/s", flush=True)
    finally:
        if distill_reader is not None and hasattr(distill_reader, "close"):
            distill_reader.close()
    if rank == 0:
        save_models(args, exe, net)
    train_samples = sum(e["samples"] for e in history["epochs"])
    train_seconds = sum(e["train_seconds"] for e in history["epochs"])
    history["samples_per_s"] = train_samples / train_seconds if train_seconds else 0.0
    history["test_acc"] = history["epochs"][-1]["test_acc"] if history["epochs"] else None
    if history["epochs"] and n_val:  # model selection on the validation set, never on the test set
        best = max(history["epochs"], key=lambda e: (e["val_acc"], e["epoch"]))
        history["best_val_epoch"], history["best_val_acc"] = best["epoch"], best["val_acc"]
        history["test_acc_at_best_val"] = best["test_acc"]
    if args.metrics_out and rank == 0:
        with open(args.metrics_out, "w") as f:
            json.dump(history, f, indent=1)
    return history


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    history = train(args)
    if history["rank"] == 0 and history["epochs"]:
        print(f"The classification accuracy is {100 * history['test_acc']:.2f}% ({args.model}, "
              f"{history['samples_per_s']:.0f} samples/s)", flush=True)


if __name__ == "__main__":
    main()
