"""PaddleSlim's dist.merge example (seed docs), with ``fluid`` replaced by ``paddle.static``.

Conversion: ``fluid.layers.data(name, shape=[1, 28, 28])`` -> ``paddle.static.data(name, shape=[None, 1, 28, 28])``
(``paddle.static.data`` does not add the batch dimension), ``fluid.layers.conv2d`` -> ``paddle.static.nn.conv2d``,
``fluid.CPUPlace/CUDAPlace`` -> ``paddle.CPUPlace/CUDAPlace``.

Run: ``python examples/dist_seed/merge_example.py`` (runs one random batch and prints a JSON line),
``--as-written`` runs the seed's lines only (no parameter initialization, no execution).
"""
import argparse
import json

import numpy as np
import paddle

import distill_reader.dist as dist

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
with paddle.static.program_guard(teacher_program):
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
    exe.run(paddle.static.default_startup_program())
    teacher_alone = exe.run(teacher_program, feed={'y': batch}, fetch_list=[out])[0]
dist.merge(teacher_program, student_program,
                          data_name_map, place)

if args.as_written:
    print(json.dumps({"teacher_ops": sum(op.type.startswith("conv2d") for op in student_program.global_block().ops)}))
else:
    # Added: the merged teacher computes exactly what the teacher alone computed on the same batch.
    exe.run(paddle.static.default_startup_program())
    merged = exe.run(student_program, feed={'x': batch}, fetch_list=['teacher_' + out.name])[0]
    print(json.dumps({"teacher_out": "teacher_" + out.name, "shape": list(merged.shape),
                      "max_abs_diff": float(np.abs(merged - teacher_alone).max())}))
