"""PaddleSlim's dist.merge example (seed docs), with ``fluid`` replaced by ``paddle.static``.

Conversion: ``fluid.layers.data(name, shape=[1, 28, 28])`` -> ``paddle.static.data(name, shape=[None, 1, 28, 28])``
(``paddle.static.data`` does not add the batch dimension), ``fluid.layers.conv2d`` -> ``paddle.static.nn.conv2d``,
``fluid.CPUPlace/CUDAPlace`` -> ``paddle.CPUPlace/CUDAPlace``.

Run: ``python examples/dist_seed/merge_example.py`` (runs one random batch and prints a JSON line),
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
                    help="run only the seed's lines: build, merge, without initializing or running")
args = parser.parse_args()

paddle.enable_static()
student_program = paddle.static.Program()
with paddle.static.program_guard(student_program):
    x = paddle.static.data(name='x', shape=[None, 1, 28, 28])
    conv = paddle.static.nn.conv2d(x, 32, 1)
    out = paddle.static.nn.conv2d(conv, 64, 3, padding=1)
teacher_program = paddle.static.Program()
# Changed: the teacher has its own startup program and scope. Paddle 3 restarts generated names in every
# program_guard, so teacher and student both declare conv2d_0.w_0 ...: one shared startup program cannot hold both.
teacher_startup, teacher_scope = paddle.static.Program(), paddle.static.Scope()
with paddle.static.program_guard(teacher_program, teacher_startup):
    y = paddle.static.data(name='y', shape=[None, 1, 28, 28])
    conv = paddle.static.nn.conv2d(y, 32, 1)
    conv = paddle.static.nn.conv2d(conv, 32, 3, padding=1)
    out = paddle.static.nn.conv2d(conv, 64, 3, padding=1)
data_name_map = {'y': 'x'}
USE_GPU = False
place = paddle.CUDAPlace(0) if USE_GPU else paddle.CPUPlace()

# Added (the seed never ran its program): the teacher's parameters must exist when merge copies them.
exe = paddle.static.Executor(place)
batch = np.random.RandomState(0).rand(2, 1, 28, 28).astype('float32')
if not args.as_written:
    with paddle.static.scope_guard(teacher_scope):
        exe.run(teacher_startup)
        teacher_alone = exe.run(teacher_program, feed={'y': batch}, fetch_list=[out])[0]
dist.merge(teacher_program, student_program,
                          data_name_map, place, teacher_scope=teacher_scope)

if args.as_written:
    print(json.dumps({"teacher_ops": sum(op.type.startswith("conv2d") for op in student_program.global_block().ops)}))
else:
    # Added: the merged teacher computes exactly what the teacher alone computed on the same batch.
    exe.run(paddle.static.default_startup_program())
    merged = exe.run(student_program, feed={'x': batch}, fetch_list=['teacher_' + out.name])[0]
    print(json.dumps({"teacher_out": "teacher_" + out.name, "shape": list(merged.shape),
                      "max_abs_diff": float(np.abs(merged - teacher_alone).max())}))
