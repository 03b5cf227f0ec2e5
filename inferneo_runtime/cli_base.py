"""What every `inferneo` command shares: the Typer app, the consoles, and the one mapping from an error to
a message and an exit code (EXIT_CODES). The commands live in cli.py (runtime) and cli_build.py (build side)."""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from typing import Iterator

import typer
from rich.console import Console
from rich.markup import escape

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Inferneo: compile Hugging Face checkpoints into validated artifacts and run them.")
out = Console()
err = Console(stderr=True, soft_wrap=True)

# one paragraph: the help's renderer keeps hard line breaks, so they would split lines mid-phrase
EXIT_CODES = ("Exit codes: 0 ok; 1 unexpected error; 2 bad input (recipe, arguments, request); 3 bad or unreadable "
              "manifest; 4 integrity failure (checksum/size); 5 missing extra or toolchain; 6 goldens do not "
              "reproduce; 7 validation failed at build (nothing published); 8 S3 error (missing bucket/key, access "
              "denied); 9 signature missing, untrusted or invalid.")

TRUSTED_KEY_HELP = "Ed25519 public key the manifest must be signed with (repeatable; default $INFERNEO_TRUSTED_KEYS)"


def run_command(fn, as_json: bool):
    """Run a command's body: any error reaches the user as one line (or a JSON object) and its exit code."""
    try:
        return fn()
    except typer.Exit:
        raise
    except KeyboardInterrupt:
        err.print("[red]interrupted[/red]")
        raise typer.Exit(130)
    except Exception as e:  # every error reaches the user as one line and an exit code
        raise _fail(e, as_json) from None


def _fail(e: BaseException, as_json: bool) -> "typer.Exit":
    code = getattr(e, "exit_code", 1)
    message = str(e) or type(e).__name__
    if as_json:
        payload = {"ok": False, "error": type(e).__name__, "message": message, "exit_code": code}
        if getattr(e, "details", None) is not None:
            payload["details"] = e.details
        print(json.dumps(payload))
    else:
        err.print(f"[red]error:[/red] {escape(message)}", highlight=False)
    if code == 1 and os.environ.get("INFERNEO_DEBUG"):
        raise e
    return typer.Exit(code)


@contextmanager
def needs_extra(command: str, extra: str = "build") -> Iterator[None]:
    """An import in this block that fails says which extra installs it (exit 5), not a traceback."""
    try:
        yield
    except ImportError as e:
        from .errors import MissingExtraError

        raise MissingExtraError(f"`inferneo {command}`", extra, getattr(e, "name", None) or "inferneo_build") from None


def log_to_stderr(quiet: bool):
    """A progress logger for long commands: dim lines on stderr, or nothing (--json keeps stdout clean)."""
    return (lambda _: None) if quiet else (lambda m: err.print(f"[dim]{m}[/dim]", highlight=False))
