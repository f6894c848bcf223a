"""The recipe's `schedule` checked as Prefect's scheduler will read it, without importing Prefect.

`cron_problem(cron)` and `timezone_problem(name)` return None for a usable value, else one
sentence saying what is wrong and what is allowed. cronsim (Debian cron's rules) parses the
cron and finds its next time; on top, the forms cronsim reads but Prefect's croniter refuses
(`5L` in the weekday field, `W` in the day of month) are refused, so a schedule that `validate`
accepts is one `frugalflow schedule` can serve (tests/test_schedule.py compares the two).
"""
from __future__ import annotations

import difflib
from datetime import datetime, timezone
from functools import lru_cache

FIELDS = "minute hour day-of-month month day-of-week"
EXAMPLE = "e.g. '0 2 * * *' (02:00 every day)"


@lru_cache(maxsize=1)
def time_zones() -> frozenset[str]:
    """The IANA names zoneinfo knows here (computing them reads the tz database: cached)."""
    from zoneinfo import available_timezones

    return frozenset(available_timezones())


def timezone_problem(name: str) -> str | None:
    if name in time_zones():
        return None
    close = difflib.get_close_matches(name, sorted(time_zones()), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return f"unknown time zone: use an IANA name such as UTC or Europe/Paris{hint}"


def cron_problem(cron: str) -> str | None:
    from cronsim import CronSim, CronSimError

    fields = cron.split()
    if len(fields) != 5:
        return f"cron must have 5 fields ({FIELDS}), {EXAMPLE}; got {len(fields)}"
    if "L" in fields[4].upper() or "W" in fields[2].upper():
        return (f"'L' in the day-of-week field and 'W' in the day-of-month field are not accepted by "
                f"Prefect's scheduler; five fields: {FIELDS}, {EXAMPLE}")
    try:
        next(CronSim(cron, datetime(2000, 1, 1, tzinfo=timezone.utc)))
    except CronSimError as exc:
        return (f"not a usable cron expression ({str(exc).lower()}); allowed: minute 0-59, hour 0-23, "
                "day-of-month 1-31 (a day the month has), month 1-12 or JAN-DEC, day-of-week 0-7 or SUN-SAT; "
                f"{EXAMPLE}")
    except StopIteration:
        return f"the cron never fires (no such date); {EXAMPLE}"
    return None
