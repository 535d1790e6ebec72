"""The no-op Lambda function `shardline-loadtest bench function` runs
through the worker's Runtime API: it reads nothing and fails nothing, so
what the benchmark measures is the cost of the invocation itself.

With SHARDLINE_BENCH_CPU_DIR set (the benchmark sets it), each process
writes its CPU time so far, once, at its first invocation, to a file named
by its pid there: the benchmark subtracts it from the CPU time the process
has at the end, which leaves the CPU its invocations cost without its
start-up. Nothing else runs per invocation.
"""

import os
import time

_CPU_DIR = os.environ.get("SHARDLINE_BENCH_CPU_DIR")
_reported = not _CPU_DIR


def handler(event, context):
    global _reported
    if not _reported:
        _reported = True
        with open(os.path.join(_CPU_DIR, str(os.getpid())), "w") as f:
            f.write(repr(time.process_time()))
    return {"batchItemFailures": []}
