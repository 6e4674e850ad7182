"""PaddleSlim's dist.l2_loss example (seed docs), with ``fluid`` replaced by ``paddle.static``.

Conversion: ``fluid.layers.data(name, shape=[1, 28, 28])`` -> ``paddle.static.data(name, shape=[None, 1, 28, 28])``
(``paddle.static.data`` does not add the batch dimension), ``fluid.layers.conv2d`` -> ``paddle.static.nn.conv2d``,
``fluid.CPUPlace/CUDAPlace`` -> ``paddle.CPUPlace/CUDAPlace``.

Run: ``python examples/dist_seed/l2_loss_example.py`` (runs one random batch and prints a JSON line),
``--as-written`` runs the seed's lines only (no parameter initialization, no execution).
"""
import argparse
import json
import os

# dist.merge and the name-addressed losses need legacy static programs: on paddle 3 the flag must be set before
# paddle is imported (paddle 2.6 builds legacy programs anyway).
os.environ.setdefault("FLAGS_enable_pir_api", "0")

import numpy as np  # noqa: E402
import paddle  # noqa: E402

import distill_reader.dist as dist  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--as-written", action="store_true",
                    help="run only the seed's lines: build, merge and add the loss, without initializing or running")
args = parser.parse_args()

paddle.enable_static()
student_program = paddle.static.Program()
with paddle.static.program_guard(student_program):
    x = paddle.static.data(name='x', shape=[None, 1, 28, 28])
    conv = paddle.static.nn.conv2d(x, 32, 1, name='s1')
    out = paddle.static.nn.conv2d(conv, 64, 3, padding=1, name='s2')
teacher_program = paddle.static.Program()
with paddle.static.program_guard(teacher_program):
    y = paddle.static.data(name='y', shape=[None, 1, 28, 28])
    conv = paddle.static.nn.conv2d(y, 32, 1, name='t1')
    conv = paddle.static.nn.conv2d(conv, 32, 3, padding=1)
    out = paddle.static.nn.conv2d(conv, 64, 3, padding=1, name='t2')
data_name_map = {'y': 'x'}
USE_GPU = False
place = paddle.CUDAPlace(0) if USE_GPU else paddle.CPUPlace()

# Added (the seed never ran its program): the teacher's parameters must exist when merge copies them.
exe = paddle.static.Executor(place)
batch = np.random.RandomState(0).rand(2, 1, 28, 28).astype('float32')
if not args.as_written:
    exe.run(paddle.static.default_startup_program())
dist.merge(teacher_program, student_program, data_name_map, place)
with paddle.static.program_guard(student_program):
    distillation_loss = dist.l2_loss('teacher_t2.tmp_1', 's2.tmp_1',
                                     student_program)

if args.as_written:
    print(json.dumps({"loss_var": distillation_loss.name, "loss_shape": list(distillation_loss.shape)}))
else:
    # Added: run one batch; recompute the loss with NumPy from the fetched teacher and student tensors.
    exe.run(paddle.static.default_startup_program())
    loss, t, s = exe.run(student_program, feed={'x': batch},
                         fetch_list=[distillation_loss, 'teacher_t2.tmp_1', 's2.tmp_1'])
    reference = np.mean((s.astype(np.float64) - t) ** 2)
    print(json.dumps({"loss": float(loss), "numpy": float(reference)}))
