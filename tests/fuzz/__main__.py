"""Coverage-guided fuzzing of one harness with atheris (libFuzzer), from its corpus in tests/fuzz/corpus/.

    python -m tests.fuzz lod_merge -runs=1000000           # a bounded run; exit 0 when nothing was found
    python -m tests.fuzz endpoints -max_total_time=3       # the suite's short run
    python -m tests.fuzz --list

Inputs that add coverage go to ``--scratch`` (a temporary folder by default), never into the repository's
corpus; an input that finds a fault is written as ``<scratch>/finding-<sha1>`` and the run exits non-zero.
Copy a finding into ``tests/fuzz/corpus/<harness>/fault-<what>`` once it is fixed. libFuzzer flags after the
harness name pass through (``-runs``, ``-max_total_time``, ``-jobs``, ``-max_len``, ...); ``-timeout=10`` (libFuzzer's
watchdog for a run that never returns; each harness checks 2 s itself, twice) and ``-rss_limit_mb=2048`` are set
unless given; ``pantheon_transport`` gets 8192 MB: it starts a thread per input, and under libFuzzer resident memory
grows with every thread started (llvm-project issue 57556; about 5 KB per input here), while the harness itself
stays flat (3,000 mutated inputs in a plain loop: 65-67 MB), so 2048 MB would end a run at about 370,000 executions.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import traceback

import atheris

CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")
DEFAULTS = {"-timeout": "10", "-rss_limit_mb": "2048", "-max_len": "8192", "-print_final_stats": "1"}
HARNESS_DEFAULTS = {"pantheon_transport": {"-rss_limit_mb": "8192"}}   # a thread per input: see the docstring


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description="Fuzz one entry point of untrusted bytes with atheris (coverage-guided, in process).",
        epilog="Other arguments are libFuzzer flags, e.g. -runs=1000000 (default: run until a finding) or "
               "-max_total_time=SECONDS. Set by default: " + " ".join(f"{k}={v}" for k, v in DEFAULTS.items()))
    parser.add_argument("harness", nargs="?", help="harness name (see --list)")
    parser.add_argument("--list", action="store_true", help="print the harness names and their entry points")
    parser.add_argument("--collect", default=None, metavar="FILE",
                        help="survey mode: record each distinct finding (exception type and the line that raised it) "
                             "as a JSON line in FILE with its input in the scratch folder, and go on fuzzing "
                             "(default: off, the first finding ends the run)")
    parser.add_argument("--scratch", default=None,
                        help="folder for new coverage inputs and findings (default: a new temporary folder)")
    args, flags = parser.parse_known_args(argv)
    scratch = None if args.list else (args.scratch or tempfile.mkdtemp(prefix=f"fuzz-{args.harness}-"))
    if scratch is not None:
        os.makedirs(scratch, exist_ok=True)
        os.environ["DISTILL_FUZZ_SCRATCH"] = scratch   # the harnesses' own files go there too (harnesses._SCRATCH)
    with atheris.instrument_imports(include=["distill_reader", "teachers", "discovery", "tests.fuzz"]):
        from .harnesses import HARNESSES, check_input
    if args.list or args.harness not in HARNESSES:
        for harness in HARNESSES.values():
            print(f"{harness.name:20s} {harness.entry_point}")
        sys.exit(0 if args.list else 2)
    harness = HARNESSES[args.harness]
    given = {flag.split("=", 1)[0] for flag in flags}
    defaults = {**DEFAULTS, **HARNESS_DEFAULTS.get(harness.name, {})}
    flags += [f"{k}={v}" for k, v in defaults.items() if k not in given]
    flags += [f"-artifact_prefix={os.path.join(scratch, 'finding-')}", scratch, os.path.join(CORPUS, harness.name)]
    print(f"fuzzing {harness.name} ({harness.entry_point}); new inputs and findings in {scratch}", flush=True)

    seen: set = set()

    def one_input(data: bytes) -> None:
        if args.collect is None:
            check_input(harness, data)
            return
        try:
            check_input(harness, data)
        except Exception as exc:  # noqa: BLE001 - survey mode records every kind of finding once
            record(exc, data)

    def record(exc: Exception, data: bytes) -> None:
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        where = f"{os.path.relpath(frame.filename)}:{frame.lineno}"
        signature = f"{type(exc).__name__} at {where}"
        if signature in seen:
            return
        seen.add(signature)
        name = os.path.join(scratch, f"finding-{hashlib.sha1(data).hexdigest()}")
        with open(name, "wb") as f:
            f.write(data)
        with open(args.collect, "a") as f:
            f.write(json.dumps({"harness": harness.name, "signature": signature, "message": str(exc)[:300],
                                "input": name}) + "\n")

    atheris.Setup([sys.argv[0], *flags], one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
