"""Backup verification throughput: pluginmon's local reader (read + SHA-256 in a worker thread,
driven from the event loop, as `POST /api/v1/backups/{id}/verify` runs it) against coreutils
`sha256sum` on the same file in the same run.

A file of SIZE MiB of random bytes is written to a temporary directory and read once to warm
the page cache, so both sides hash from memory and the comparison is of the hashing path, not
of the disk. Then ROUNDS alternating rounds time `sha256sum FILE` (wall clock, including its
process start) and `PathReader.verify()`; the best round of each is kept (on a loaded host the
best round is the least disturbed one). Reported: MB/s of each and their ratio.

Run: .venv/bin/python bench/backups.py [--size-mib 256] [--rounds 5]
Last line: backup_verify_vs_sha256sum=<pluginmon MB/s / sha256sum MB/s>.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from pluginmon.registry.backup_readers import Expected, PathReader, ReadResult


def _write(path: Path, size_mib: int) -> str:
    digest = hashlib.sha256()
    with path.open("wb") as handle:
        for _ in range(size_mib):
            chunk = os.urandom(1 << 20)
            digest.update(chunk)
            handle.write(chunk)
    return digest.hexdigest()


def _sha256sum(path: Path) -> tuple[float, str]:
    started = time.perf_counter()
    out = subprocess.run(["sha256sum", str(path)], check=True, capture_output=True, text=True)
    return time.perf_counter() - started, out.stdout.split()[0]


async def _pluginmon(reader: PathReader, path: Path, expected: Expected) -> float:
    started = time.perf_counter()
    outcome = await reader.verify(str(path), expected)
    elapsed = time.perf_counter() - started
    if outcome.result is not ReadResult.VERIFIED:
        raise SystemExit(f"verification failed: {outcome.result} {outcome.reason}")
    return elapsed


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if shutil.which("sha256sum") is None:
        raise SystemExit("sha256sum (coreutils) is needed for the comparison")
    with tempfile.TemporaryDirectory(prefix="pluginmon-bench-backups-") as tmp:
        root = Path(tmp)
        path = root / "artifact.bin"
        sha = _write(path, args.size_mib)
        size = path.stat().st_size
        expected = Expected(size_bytes=size, sha256_hex=sha)
        reader = PathReader("local", (root,))
        _sha256sum(path)  # warm the page cache
        tool: list[float] = []
        ours: list[float] = []
        for _ in range(args.rounds):
            seconds, tool_sha = _sha256sum(path)
            if tool_sha != sha:
                raise SystemExit("sha256sum disagrees with the written content")
            tool.append(seconds)
            ours.append(await _pluginmon(reader, path, expected))
    mb = size / 1e6
    tool_rate = mb / min(tool)
    our_rate = mb / min(ours)
    print(f"file: {size} bytes ({args.size_mib} MiB) in the page cache, {args.rounds} rounds")
    print(
        f"sha256sum:          best {min(tool) * 1000:.0f} ms = {tool_rate:.0f} MB/s "
        f"(rounds: {', '.join(f'{t * 1000:.0f}' for t in tool)} ms)"
    )
    print(
        f"pluginmon verify:   best {min(ours) * 1000:.0f} ms = {our_rate:.0f} MB/s "
        f"(rounds: {', '.join(f'{t * 1000:.0f}' for t in ours)} ms)"
    )
    print(f"load average: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"backup_verify_vs_sha256sum={our_rate / tool_rate:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
