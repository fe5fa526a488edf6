"""Shared by every click command: user errors are one line on stderr with exit code 2."""
from __future__ import annotations

import functools
import os
import sys
from typing import Any, Callable

import click

from autoplan.errors import AutoplanError


def fail_cleanly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """AutoplanError -> ``error: ...`` and exit 2; a bug -> one line and exit 1 (AUTOPLAN_DEBUG=1 re-raises)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except AutoplanError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except Exception as exc:  # noqa: BLE001 - a bug: one line unless asked for the traceback
            if os.environ.get("AUTOPLAN_DEBUG"):
                raise
            first = (str(exc).splitlines() or [""])[0][:200]
            click.echo(f"internal error: {type(exc).__name__}: {first} (set AUTOPLAN_DEBUG=1 for the traceback)", err=True)
            sys.exit(1)

    return wrapper
