"""pytest plugin of the compatibility runner: one JSON line per test phase.

Loaded with `-p report_plugin` (tests/compat on PYTHONPATH). Writes to the
file named by $COMPAT_REPORT, appending and flushing each line, so a run cut
short by `timeout` still leaves every result it reached. run.py folds the
phases into one outcome per test id.
"""

import json
import os

_out = None


def _file():
    global _out
    if _out is None:
        _out = open(os.environ["COMPAT_REPORT"], "a", buffering=1)
    return _out


def _message(report):
    longrepr = report.longrepr
    if longrepr is None:
        return ""
    if isinstance(longrepr, tuple):  # skip: (file, line, reason)
        return str(longrepr[-1])
    crash = getattr(longrepr, "reprcrash", None)
    if crash is not None and crash.message:
        return crash.message
    return str(longrepr)


def pytest_runtest_logreport(report):
    line = {"id": report.nodeid, "when": report.when, "outcome": report.outcome,
            "duration": round(report.duration, 3)}
    if hasattr(report, "wasxfail"):
        line["xfail"] = True
    if report.outcome != "passed":
        text = _message(report).strip()
        line["message"] = text.splitlines()[0][:300] if text else ""
    _file().write(json.dumps(line) + "\n")


def pytest_sessionfinish(session, exitstatus):
    global _out
    if _out is not None:
        _out.close()
        _out = None
