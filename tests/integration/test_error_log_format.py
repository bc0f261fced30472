"""logging.error_log_format: json -- preforkd's error log as one JSON object per line, for
log shippers (what gunicorn users build with logconfig_dict and a JSON formatter, and uWSGI
users with a log encoder): on stderr or a file, on syslog after the `ident[pid]:` tag, and
switched by a reload like any other logging setting.
"""

from __future__ import annotations

import json
import re
import signal
import socket
from functools import partial
from pathlib import Path
from typing import Any

from harness import Datagrams, ServerFactory, connect, http_request, read_response, wait_until

APP = """
def application(environ, start_response):
    path = environ["PATH_INFO"]
    if path == "/boom":
        raise ValueError("kaput\\nsecond line")
    if path == "/errors":
        environ["wsgi.errors"].write("app says: caf\\u00e9\\n")
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]
"""

ISO_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}[+-]\d{2}:\d{2}")


def records(text: str) -> list[dict[str, Any]]:
    """Every whole line of `text` as a JSON object (a last line still being written is left
    for later); fails naming the first line that is not one."""
    parsed = []
    for line in text.splitlines(keepends=True):
        if not line.endswith("\n"):
            break
        try:
            entry = json.loads(line)
        except ValueError:
            raise AssertionError(f"not a JSON line: {line!r}\n{text}") from None
        assert isinstance(entry, dict), line
        parsed.append(entry)
    return parsed


def with_message(entries: list[dict[str, Any]], prefix: str) -> list[dict[str, Any]]:
    return [e for e in entries if str(e.get("message", "")).startswith(prefix)]


def get(path: Path, target: str) -> int:
    with connect(str(path)) as sock:
        sock.sendall(http_request("GET", target))
        return read_response(sock).status


def settings(http_socket: Path, **logging: Any) -> dict[str, Any]:
    return {
        "app": "app:application",
        "bind": [f"unix:{http_socket}"],
        "workers": {"count": 1},
        "logging": logging,
    }


def test_a_json_error_log_holds_one_object_per_record(
    server_factory: ServerFactory, short_tmp: Path
) -> None:
    http_socket = short_tmp / "http.sock"
    server = server_factory(
        settings(http_socket, error_log_format="json"), app_source=APP, wait_ready=False
    )
    wait_until(lambda: with_message(records(server.log()), "ready: 1 worker"), 15,
               message="no such record")
    assert get(http_socket, "/boom") == 500
    assert get(http_socket, "/errors") == 200
    wait_until(lambda: with_message(records(server.log()), "app says"), 5,
               message="no such record")
    server.signal(signal.SIGTERM)
    assert server.wait_exit(15) == 0, server.log_tail()

    entries = records(server.log())
    assert all(set(e) >= {"time", "level", "pid", "logger", "message"} for e in entries)
    assert all(ISO_TIME.fullmatch(e["time"]) for e in entries), entries
    (ready,) = with_message(entries, "ready: 1 worker")
    assert (ready["level"], ready["pid"], ready["logger"]) == ("INFO", server.pid, "prefork")
    # the application's exception: its traceback in the record, not on lines of its own
    (failed,) = [e for e in entries if "exception" in e]
    assert failed["level"] == "ERROR" and failed["pid"] != server.pid
    assert failed["exception"].startswith("Traceback (most recent call last):")
    assert failed["exception"].endswith("ValueError: kaput\nsecond line")
    (said,) = with_message(entries, "app says")
    assert (said["message"], said["level"]) == ("app says: caf\u00e9", "ERROR")
    assert "caf\\u00e9" in server.log()  # ASCII on the wire, whatever the locale
    assert entries[-1]["pid"] == server.pid  # the master's last word is a record too


def test_json_on_syslog_follows_the_tag(server_factory: ServerFactory, short_tmp: Path) -> None:
    log_socket = short_tmp / "log.sock"
    http_socket = short_tmp / "http.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(str(log_socket))
        server = server_factory(
            settings(http_socket, error_log_format="json",
                     syslog={"enabled": True, "address": f"unix:{log_socket}"}),
            app_source=APP, wait_ready=False,
        )
        inbox = Datagrams(receiver)
        tagged = r"^<14>preforkd\[(\d+)\]: (\{.*\"message\": \"ready: 1 worker.*\})$"
        ready = wait_until(partial(inbox.received, tagged), 15,
                           message="no JSON ready record")
        assert int(ready.group(1)) == server.pid
        entry = json.loads(ready.group(2))
        assert (entry["level"], entry["pid"]) == ("INFO", server.pid)
        assert get(http_socket, "/errors") == 200
        said = wait_until(partial(inbox.received, r"^<11>preforkd\[\d+\]: (\{.*app says.*\})$"),
                          5, message="no JSON record of the application's line")
        assert json.loads(said.group(1))["message"] == "app says: caf\u00e9"


def test_a_reload_switches_the_error_log_to_json(
    server_factory: ServerFactory, short_tmp: Path
) -> None:
    http_socket = short_tmp / "http.sock"
    server = server_factory(settings(http_socket), app_source=APP)
    before = len(server.log())
    assert before and not server.log().startswith("{")
    server.config.write_text(server.config.read_text().replace(
        "logging: {}", "logging:\n  error_log_format: json"
    ))
    assert "error_log_format: json" in server.config.read_text()
    server.signal(signal.SIGHUP)

    def since_json() -> list[dict[str, Any]]:
        """The records from the first JSON line on: until the new generation serves, the
        master logs with the old setup (its `HUP: reloading` is text)."""
        text = server.log()[before:]
        start = text.find("\n{")
        return records(text[start + 1:]) if start >= 0 else []

    wait_until(lambda: with_message(since_json(), "reloaded: generation 2"), 15,
               message="no JSON reloaded record")
    assert get(http_socket, "/errors") == 200
    wait_until(lambda: with_message(since_json(), "app says"), 5, message="no JSON app record")
    assert "[INFO] HUP: reloading" in server.log()[before:]
    # what the old generation logged stays as it was written
    assert re.search(r"\[INFO\] ready: 1 worker", server.log()[:before])
