"""``python -m distill_reader.knowledge inspect PATH``: describe a knowledge cache and verify every checksum."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

from .errors import CorruptShardError, KnowledgeError
from .reader import KnowledgeReader
from .safe_io import lstat_problem
from .spec import describe

EXIT_OK, EXIT_CORRUPT, EXIT_USAGE, EXIT_UNREADABLE = 0, 1, 2, 3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m distill_reader.knowledge",
        description="Tools for distill-reader knowledge files (the offline teacher-knowledge caches).",
        epilog=f"exit status: {EXIT_OK} ok, {EXIT_CORRUPT} a shard is missing, truncated, corrupt, or not a regular "
               f"file (a link, FIFO or directory: never followed or opened), {EXIT_USAGE} bad command line, "
               f"{EXIT_UNREADABLE} not a readable knowledge cache (no or bad manifest, or a manifest that is not a "
               "regular file).")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    inspect = commands.add_parser(
        "inspect", help="print the knowledge description, sample count, size on disk and storage, and verify "
                        "every shard checksum",
        description="Print the knowledge description (field names, per-sample shapes, dtypes, storage), the sample "
                    "count, whether the cache is complete, its size on disk, and verify the sha256 of every shard.",
        epilog=parser.epilog)
    inspect.add_argument("path", metavar="PATH", help="the knowledge cache directory (the one holding manifest.json)")
    inspect.add_argument("--no-verify", action="store_true",
                         help="skip the checksum verification (only read the manifest and check the file sizes)")
    inspect.add_argument("--shards", action="store_true", help="also list every shard: file, sample range, bytes")
    inspect.add_argument("--json", action="store_true",
                         help="print one JSON object instead of text (description, counts, sizes, verification)")
    inspect.add_argument("--progress", action="store_true", help="show a progress bar on stderr while verifying")
    return parser


def inspect(args: argparse.Namespace) -> int:
    try:
        reader = KnowledgeReader(args.path)
    except KnowledgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_UNREADABLE
    with reader:
        status, problem, problems = "ok", None, []
        if args.no_verify:
            status = "not verified"
            for info in reader.shards:
                full = os.path.join(args.path, info.file)
                kind = lstat_problem(full)  # never opens nor follows the entry
                size = os.lstat(full).st_size if not kind else None
                if kind or size != info.nbytes:
                    problems.append(info.file)
                    problem = f"{info.file}: {kind or f'{size} bytes'}, manifest says {info.nbytes} bytes"
        else:
            try:
                reader.verify(progress=args.progress)
            except CorruptShardError as exc:
                problem, problems = str(exc), exc.shards
        if problems:
            status = "CORRUPT"
        on_disk = _disk_bytes(args.path)
        if args.json:
            print(json.dumps({
                "path": args.path, "fields": [f.to_json() for f in reader.fields], "num_samples": reader.num_samples,
                "complete": reader.complete, "input_digests": reader.has_input_digests,
                "input_digest_scheme": reader.digest_scheme, "shards": len(reader.shards),
                "shard_bytes": reader.nbytes, "bytes_on_disk": on_disk, "meta": reader.meta,
                "verification": status, "corrupt_shards": problems}, indent=1))
        else:
            print(f"knowledge cache: {args.path}")
            print("fields:")
            print(describe(reader.fields))
            print(f"samples: {reader.num_samples} ({'complete' if reader.complete else 'INCOMPLETE'})")
            print(f"shards: {len(reader.shards)}, {_human(reader.nbytes)} of shards, {_human(on_disk)} on disk")
            print(f"input digests: {'yes (' + str(reader.digest_scheme) + ')' if reader.has_input_digests else 'no'}")
            for key, value in reader.meta.items():
                text = json.dumps(value)
                print(f"meta {key}: {text if len(text) <= 100 else text[:97] + '...'}")
            if args.shards:
                for info in reader.shards:
                    print(f"  {info.file}: samples [{info.start}, {info.stop}), {info.nbytes} bytes, "
                          f"sha256 {info.checksum[:16]}...")
            print(f"checksums: {status}" + (f" ({len(reader.shards)} shards)" if status == "ok" else ""))
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return EXIT_CORRUPT
    return EXIT_OK


def _disk_bytes(path: str) -> int:
    total = 0
    for entry in os.scandir(path):
        if entry.is_file(follow_symlinks=False):
            total += entry.stat().st_blocks * 512
    return total


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "inspect":
        try:
            return inspect(args)
        except CorruptShardError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_CORRUPT
        except (KnowledgeError, OSError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_UNREADABLE
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
