"""Toy student of Pantheon: merges the knowledge of teacher 0 (2x-1) and teacher 1 (2x+1) and prints every sample.

"result" is shared by both teachers: merged by mean it equals 2x, by sum 4x.
"""
import argparse

from utils import read_token, setup_logging, str2bool

from distill_reader.pantheon import Student


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    for i in (0, 1):
        parser.add_argument(f"--in_address{i}", type=str, default=None,
                            help=f"online teacher {i} as <host>:<port> (default: %(default)s)")
        parser.add_argument(f"--in_path{i}", type=str, default=None,
                            help=f"offline knowledge directory of teacher {i} (default: %(default)s)")
    parser.add_argument("--merge_strategy", type=str, default="sum", choices=["sum", "mean"],
                        help="how to merge the shared key 'result' (default: %(default)s)")
    parser.add_argument("--test_send_recv", type=str2bool, default=False,
                        help="exchange a few messages with the teachers first (default: %(default)s)")
    parser.add_argument("--batch_size", type=int, default=32,
                        help="the student's batch size (default: %(default)s)")
    parser.add_argument("--drop_last", type=str2bool, default=False,
                        help="drop the last batch when it is smaller than --batch_size (default: %(default)s)")
    parser.add_argument("--passes", type=int, default=1,
                        help="passes over the knowledge; online teachers need --serving_times >= this "
                             "(default: %(default)s)")
    parser.add_argument("--token_file", type=str, default=None,
                        help="file holding the shared secret of online teachers (default: "
                             "$DISTILL_PANTHEON_TOKEN; never give the secret itself on the command line)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds to wait for teachers (default: $DISTILL_PANTHEON_TIMEOUT or 60)")
    args = parser.parse_args()
    for i in (0, 1):
        if bool(getattr(args, f"in_address{i}")) == bool(getattr(args, f"in_path{i}")):
            parser.error(f"give exactly one of --in_address{i} or --in_path{i}")
    return args


def run(args: argparse.Namespace) -> None:
    student = Student(merge_strategy={"result": args.merge_strategy}, token=read_token(args.token_file),
                      timeout=args.timeout)
    student.register_teacher(in_address=args.in_address0, in_path=args.in_path0)
    student.register_teacher(in_address=args.in_address1, in_path=args.in_path1)
    student.start()

    if args.test_send_recv:
        for t in range(2):
            if getattr(args, f"in_address{t}"):
                for _ in range(3):
                    print(student.recv(t))
        student.send("message from student!")

    knowledge_desc = student.get_knowledge_desc()
    print(f"knowledge description: {dict(knowledge_desc)}")
    for _ in range(args.passes):
        data_generator = student.get_knowledge_generator(batch_size=args.batch_size, drop_last=args.drop_last)
        for batch_data in data_generator():
            batch_size = list(batch_data.values())[0].shape[0]
            for i in range(batch_size):
                print({key: value[i].tolist() for key, value in batch_data.items()})
    student.close()


if __name__ == "__main__":
    setup_logging()
    run(parse_args())
