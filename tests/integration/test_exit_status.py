"""The exit status a stop earned is the one the master exits with.

Defect (the test failed before the fix): after its graceful stop the master returned from
main, and the interpreter's teardown first puts SIG_DFL back for every signal that has a
Python handler, then clears the modules. A TERM during that teardown (a second stop, as the
test harness and systemd after `preforkd stop` may send) killed it: status -15 (143 in a
shell) after a clean stop, which a unit with Restart=on-failure counts as a failure. The
teardown of a preloaded application's modules can take long; here a finalizer makes it last
a second, so the TERM surely lands inside it.
"""

from __future__ import annotations

import signal
from pathlib import Path

from harness import ServerFactory, wait_until

# A preloaded application with an object whose finalizer runs while the master's modules
# are torn down at exit: it says so in a file, then takes a second.
SLOW_TEARDOWN_APP = """
import os
import time


class Slow:
    # what __del__ uses, held here: the modules are being cleared when it runs
    def __del__(self, mark=os.environ["EXIT_STATUS_MARK"], sleep=time.sleep, open=open):
        with open(mark, "w") as f:
            f.write("tearing down")
        sleep(1.0)


_held = Slow()  # in the master, which imports this (preload); workers leave by os._exit


def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]
"""


def test_a_term_while_the_stopped_master_tears_down_leaves_status_0(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    mark = tmp_path / "teardown"
    server = server_factory(
        {"app": "app:app", "preload_app": True, "workers": {"count": 1}},
        app_source=SLOW_TEARDOWN_APP, env={"EXIT_STATUS_MARK": str(mark)},
    )
    server.signal(signal.SIGTERM)
    server.wait_for_log("] stopped", 10)
    wait_until(mark.exists, 10, message="the master never tore its modules down")
    server.signal(signal.SIGTERM)  # as a second stop would
    assert server.wait_exit(10) == 0
