"""Every test runs with the engine's debug checks on (block ids used by attention are validated);
the run ends with pytest's exit status, without the interpreter's native teardown."""

import os
import sys

import pytest

os.environ["GEMMA4_DEBUG_CHECKS"] = "1"  # set at import: engines started in subprocesses inherit it


_exit_status: list[int] = []


def pytest_sessionfinish(session, exitstatus) -> None:  # noqa: ANN001 - pytest's hook signature
    _exit_status.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config) -> None:  # noqa: ANN001
    """Leave without the interpreter's teardown once pytest has reported.

    Native extensions loaded by the suite (Ray's core worker, gRPC's C core, torch) have crashed
    with SIGSEGV while being torn down at exit, after every test had passed and the summary was
    printed (CI saw exit 139 once in several runs; every thread and process the tests started was
    gone by then). The run's result is final here, so exit with pytest's status directly.
    """
    if _exit_status:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_exit_status[-1])
