"""logging.error_log_format: the error log's records as text or as one JSON object a line."""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime

from prefork.accessformat import IsoClock
from prefork.config import from_mapping
from prefork.logs import JsonFormatter, error_formatter


def record(
    message: str, *args: object, exc: bool = False, stack: bool = False
) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise KeyError("missing")
        except KeyError:
            exc_info = sys.exc_info()
    made = logging.LogRecord("prefork.wsgi", logging.ERROR, __file__, 1, message, args, exc_info)
    if stack:
        made.stack_info = "Stack (most recent call last):\n  File x"
    return made


def test_a_record_is_one_json_line_with_its_fields() -> None:
    entry = record("worker %d said: %s", 3, "caf\u00e9\nsecond line")
    line = JsonFormatter().format(entry)
    assert "\n" not in line and line.isascii()
    parsed = json.loads(line)
    assert parsed == {
        "time": parsed["time"],
        "level": "ERROR",
        "pid": entry.process,
        "logger": "prefork.wsgi",
        "message": "worker 3 said: caf\u00e9\nsecond line",
    }
    assert abs(datetime.fromisoformat(parsed["time"]).timestamp() - entry.created) < 0.001


def test_an_exception_and_a_stack_go_in_their_own_fields() -> None:
    parsed = json.loads(JsonFormatter().format(record("failed", exc=True, stack=True)))
    assert parsed["message"] == "failed"
    assert parsed["exception"].startswith("Traceback (most recent call last):")
    assert parsed["exception"].endswith("KeyError: 'missing'")
    assert parsed["stack"].startswith("Stack (most recent call last):")


def test_on_syslog_the_tag_comes_first() -> None:
    entry = record("hello")
    line = error_formatter("json", "my%app").format(entry)
    tag = f"my%app[{entry.process}]: "
    assert line.startswith(tag)
    assert json.loads(line[len(tag):])["message"] == "hello"
    assert error_formatter("text", "my%app").format(entry) == f"{tag}[ERROR] hello"


def test_text_stays_the_default() -> None:
    assert from_mapping({"app": "m:app"}).logging.error_log_format == "text"
    line = error_formatter("text").format(record("plain"))
    assert line.endswith(f"] [{record('x').process}] [ERROR] plain") and line.startswith("[")


def test_the_iso_clock_gives_milliseconds_of_the_time_asked() -> None:
    clock = IsoClock()
    when = 1_790_000_000.25
    stamp = clock(when)
    assert stamp[19:23] == ".250"
    assert datetime.fromisoformat(stamp).timestamp() == when
    assert clock(when + 0.5)[19:23] == ".750"  # the same second, kept: only the ms change
