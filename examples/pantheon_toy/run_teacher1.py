"""Toy teacher 1 of Pantheon: predicts 2x-1 for x and serves the knowledge "x", "2x-1" and "result" (= 2x-1)."""
import numpy  # noqa: F401  (numpy before paddle: paddle 2.6.2 exports zlib symbols)
from utils import make_place, parse_args, read_token, reader_config, setup_logging

from distill_reader.pantheon import Teacher


def run(args) -> None:
    import paddle  # after argument parsing, so that --help is instant

    paddle.enable_static()
    startup, program = paddle.static.Program(), paddle.static.Program()
    with paddle.static.program_guard(program, startup):
        inp_x = paddle.static.data(name="x", shape=[-1, 1], dtype="int64")
        y = inp_x * 2 - 1
        result = paddle.assign(y)

    exe = paddle.static.Executor(make_place(args.use_cuda))
    exe.run(startup)

    teacher = Teacher(out_path=args.out_path, out_port=args.out_port, out_host=args.out_host,
                      token=read_token(args.token_file), timeout=args.timeout)
    teacher.start()

    if args.test_send_recv:
        teacher.send("greetings from teacher1")
        teacher.send({"x": 1, "y": 2})
        teacher.send({3, 5})
        print(f"recved {teacher.recv()}")

    teacher.start_knowledge_service(
        feed_list=[inp_x.name],
        schema={"x": inp_x, "2x-1": y, "result": result},
        program=program,
        reader_config=reader_config(args),
        exe=exe,
        use_fp16=True,
        times=args.serving_times)


if __name__ == "__main__":
    setup_logging()
    run(parse_args(__doc__))
