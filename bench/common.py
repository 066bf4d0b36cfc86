"""What the benchmarks that drive real processes share: polling with a deadline, the
nearest-rank percentile, and the asyncio entry point that cleans up on Ctrl-C and SIGTERM alike."""

from __future__ import annotations

import asyncio
import json
import math
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from gossip.sim import percentile as nearest_rank


def percentile(values: Sequence[float], fraction: float) -> float:
    """``gossip.sim.percentile`` (nearest rank; with 20 samples p99 is the largest),
    but NaN rather than None for no values, so results stay plain floats."""
    value = nearest_rank(values, fraction)
    return math.nan if value is None else value


async def poll_until(
    check: Callable[[], Awaitable[bool]], within: float, what: str, *, every: float = 0.1
) -> float:
    """Seconds until ``check()`` holds, polled every ``every``; TimeoutError after
    ``within``."""
    started = time.monotonic()
    while not await check():
        if time.monotonic() - started > within:
            raise TimeoutError(f"{what}: not within {within:.0f} s")
        await asyncio.sleep(every)
    return time.monotonic() - started


def run_benchmark(
    name: str,
    run: Callable[[Path], Awaitable[dict[str, Any]]],
    print_table: Callable[[dict[str, Any]], None],
) -> int:
    """Run ``run(workdir)`` in a temp dir, print its table and JSON line; the exit code.

    SIGTERM cancels the run as Ctrl-C does, so the benchmark's own cleanup (stopping
    every process it started) runs either way."""

    async def main_task() -> dict[str, Any]:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as workdir:
            return await run(Path(workdir))

    try:
        results = asyncio.run(main_task())
    except (TimeoutError, RuntimeError) as exc:
        print(f"bench/{name}.py: {exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        return 130
    print_table(results)
    print(json.dumps(results, separators=(",", ":")))
    return 0
