"""The `current_datetime` tool: the date and time now, in the server's zone or a named IANA zone.

    current_datetime()                      # "2025-03-14T09:26:53+01:00 (Friday, local time CET)"
    current_datetime("Asia/Shanghai")       # "2025-03-14T16:26:53+08:00 (Friday, Asia/Shanghai)"

Models cannot know the date; this tool tells them. Zone names go through zoneinfo, which refuses
anything that is not a zone key (a path like "../../etc/passwd" included).
"""

from __future__ import annotations

from datetime import datetime, timezone as dt_timezone
from typing import Callable
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from .registry import Tool, ToolError

__all__ = ["current_datetime", "current_datetime_tool"]

_ALIASES = {"utc": "UTC", "gmt": "UTC", "z": "UTC"}


def _zone(name: str) -> ZoneInfo:
    key = _ALIASES.get(name.strip().lower(), name.strip())
    try:
        return ZoneInfo(key)
    except (ZoneInfoNotFoundError, ValueError):
        raise ToolError(f"unknown time zone {name!r}; use an IANA name like 'Europe/Berlin', "
                        "'America/New_York', 'Asia/Shanghai' or 'UTC'") from None


def current_datetime(timezone: str | None = None, *, now: Callable[[], datetime] | None = None) -> str:
    """The current date and time (ISO 8601, with the weekday). Call this for anything about today's
    date, the day of the week, or the time somewhere.

    Args:
        timezone: an IANA time zone like "Europe/Berlin" or "UTC"; default: the server's local time
    """
    current = (now or (lambda: datetime.now(dt_timezone.utc)))()
    if timezone:
        local, label = current.astimezone(_zone(timezone)), _zone(timezone).key
    else:
        local = current.astimezone()
        label = f"local time {local.tzname()}"
    return f"{local.isoformat(timespec='seconds')} ({local.strftime('%A')}, {label})"


def _tool_fn(timezone: str | None = None) -> str:
    return current_datetime(timezone)


_tool_fn.__doc__ = current_datetime.__doc__
current_datetime_tool = Tool.from_function(_tool_fn, name="current_datetime", timeout_s=5.0)
