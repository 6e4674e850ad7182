"""Teacher server throughput on paddle 2.6 and paddle 3 side by side: one model, one run.

The test CNN (``--width`` times wider) is built once per line from the same seed (the same weights on both lines)
and exported: as a legacy ``model.pdmodel`` (saved by paddle 2.6) and as a PIR ``model.json`` (saved by paddle 3).
Then ``benchmarks/bench_teacher_server.py --exported`` measures, one after the other:
paddle 2.6 serving the .pdmodel, paddle 3 serving the same .pdmodel, paddle 3 serving the PIR model.

    python benchmarks/bench_paddle_lines.py --paddle2 .venv/bin/python --paddle3 .venv-paddle3/bin/python \\
        [--width 1] [--seconds 3] [--thread 2] [--clients 8]
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

BUILD = """
import sys
import numpy  # before paddle
sys.path.insert(0, {repo!r})
from tests.support.teacher import export_teacher, save_static_model
src = save_static_model({src!r}, width={width})
export_teacher(src, {out!r}, "static")
import paddle
print(paddle.__version__)
"""

FIELDS = {"raw32": r"raw predictor, batch 32:\s+(\d+)", "served32": r"batch 32, batching on:\s+(\d+)",
          "ratio32": r"ratio to the raw predictor ([\d.]+)", "raw1": r"raw predictor, batch 1:\s+(\d+)",
          "on1": r"batch 1, batching on / off:\s+(\d+)", "off1": r"batch 1, batching on / off:\s+\d+ / (\d+)",
          "load": r"load average ([\d.]+)"}


def build(python: str, root: str, width: int) -> tuple[str, str]:
    """Export the CNN with ``python``; returns (paddle version, folder with serving_server/ and serving_client/)."""
    out = os.path.join(root, os.path.basename(os.path.dirname(os.path.dirname(python))) or "venv")
    code = BUILD.format(repo=REPO, src=os.path.join(out, "src"), out=out, width=width)
    proc = subprocess.run([python, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600, check=True)
    return proc.stdout.strip().splitlines()[-1], out


def measure(python: str, exported: str, args: argparse.Namespace) -> dict:
    cmd = [python, os.path.join(HERE, "bench_teacher_server.py"), "--exported", exported, "--seconds",
           str(args.seconds), "--thread", str(args.thread), "--clients", str(args.clients), "--client", "raw"]
    text = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, check=True).stdout
    return {key: float(re.search(pattern, text).group(1)) for key, pattern in FIELDS.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--paddle2", default=os.path.join(REPO, ".venv", "bin", "python"),
                        help="python of the paddle 2.6 environment (default: %(default)s)")
    parser.add_argument("--paddle3", default=os.path.join(REPO, ".venv-paddle3", "bin", "python"),
                        help="python of the paddle 3 environment (default: %(default)s)")
    parser.add_argument("--width", type=int, default=1, help="conv filter multiplier of the teacher CNN (default: 1)")
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per measurement (default: 3)")
    parser.add_argument("--thread", type=int, default=2, help="server predictors (default: 2)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent client processes (default: 8)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_lines_") as root:
        v2, legacy = build(args.paddle2, root, args.width)
        v3, pir = build(args.paddle3, root, args.width)
        rows = [(f"paddle {v2}, model.pdmodel", measure(args.paddle2, legacy, args)),
                (f"paddle {v3}, same model.pdmodel", measure(args.paddle3, legacy, args)),
                (f"paddle {v3}, model.json (PIR)", measure(args.paddle3, pir, args))]
    print(f"teacher CNN width {args.width}; server --thread {args.thread}, {args.clients} client processes, "
          f"{args.seconds}s per measurement; {os.cpu_count()} cores")
    print("| paddle, model | raw predictor b32 | server b32 | server / raw | raw b1 | server b1 batching on / off "
          "| load avg |")
    print("|---|---|---|---|---|---|---|")
    for label, r in rows:
        print(f"| {label} | {r['raw32']:.0f} | {r['served32']:.0f} | {r['ratio32']:.2f} | {r['raw1']:.0f} "
              f"| {r['on1']:.0f} / {r['off1']:.0f} | {r['load']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
