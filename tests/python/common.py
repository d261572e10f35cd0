"""Tiny assertion helpers shared by the client scripts.

Every script takes one argument, a libpq-style URL
(postgresql://USER@127.0.0.1:PORT/DB), runs named steps, and exits non-zero
with the step name, what was expected and the traceback on the first failure.
"""

import os
import sys
import time
import traceback


class CheckFailed(AssertionError):
    pass


_current_step = ["(setup)"]
_checks = [0]


def check(condition, what):
    _checks[0] += 1
    if not condition:
        raise CheckFailed(what)


def eq(actual, expected, what):
    _checks[0] += 1
    if actual != expected:
        raise CheckFailed(f"{what}: expected {expected!r}, got {actual!r}")


def known_shardgate_bug(bug, condition, what):
    """A check that fails through shardgate because of a shardgate bug named
    `bug` (see the comment at the call). It is strict against Postgres
    directly (SHARDGATE_TEST_TARGET=direct) and only reported, loudly, through
    shardgate. Once the bug is fixed, turn it back into check()/eq()."""
    _checks[0] += 1
    if condition:
        if os.environ.get("SHARDGATE_TEST_TARGET") == "shardgate":
            print(f"  NOTE known shardgate bug '{bug}' no longer reproduces: make the check strict again", flush=True)
        return
    if os.environ.get("SHARDGATE_TEST_TARGET") != "shardgate":
        raise CheckFailed(what)
    print(f"  SKIP known shardgate bug '{bug}': {what}", flush=True)
    print(f"SKIPPED CHECK (known shardgate bug '{bug}'): {what}", file=sys.stderr, flush=True)


def raises(exc_type, fn, what):
    """Runs fn(); it must raise exc_type. Returns the exception."""
    _checks[0] += 1
    try:
        fn()
    except exc_type as e:
        return e
    raise CheckFailed(f"{what}: expected {exc_type.__name__}, nothing was raised")


class step:
    """`with step("name"):` labels the checks inside it for failure reports."""

    def __init__(self, name):
        self.name = name

    def __enter__(self):
        _current_step[0] = self.name
        self.started = time.monotonic()
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            ms = (time.monotonic() - self.started) * 1000
            print(f"  ok  {self.name} ({ms:.0f} ms)", flush=True)
        return False

    async def __aenter__(self):
        return self.__enter__()

    async def __aexit__(self, *exc):
        return self.__exit__(*exc)


def main(client, run):
    """Runs `run(dsn)` (a function or a coroutine function) and exits."""
    if len(sys.argv) != 2:
        print(f"usage: {sys.argv[0]} postgresql://user@host:port/db", file=sys.stderr)
        sys.exit(2)
    dsn = sys.argv[1]
    started = time.monotonic()
    print(f"{client}: {dsn}", flush=True)
    try:
        result = run(dsn)
        if hasattr(result, "__await__"):
            import asyncio

            asyncio.run(result)
    except BaseException as e:  # noqa: BLE001 - report everything, including KeyboardInterrupt
        print(
            f"FAILED {client}, step '{_current_step[0]}': {type(e).__name__}: {e}",
            file=sys.stderr,
        )
        traceback.print_exc(file=sys.stderr)
        sys.stdout.flush()
        sys.exit(1)
    print(
        f"{client}: all {_checks[0]} checks passed in {time.monotonic() - started:.2f} s",
        flush=True,
    )
