"""Error types the runtime raises; the CLI maps each to an exit code (see README)."""


class InferneoError(Exception):
    """Base class: every error the runtime means to show a user."""

    exit_code = 1


class ManifestError(InferneoError):
    """inferneo.json is missing, unreadable or of an unknown schema version."""

    exit_code = 3


class IntegrityError(InferneoError):
    """A file does not match the checksum or size the manifest recorded."""

    exit_code = 4


class MissingExtraError(InferneoError):
    """An optional dependency (torch, tensorrt, boto3, ...) is needed and not installed."""

    exit_code = 5

    def __init__(self, what: str, extra: str, module: str):
        super().__init__(f"{what} needs the '{module}' package: pip install 'inferneo[{extra}]'")


class RequestError(InferneoError, ValueError):
    """A generation request is invalid (bad parameter, too long for the artifact's bounds)."""

    exit_code = 2


class GoldenMismatch(InferneoError):
    """The artifact no longer reproduces the goldens recorded at build time."""

    exit_code = 6


class S3Error(InferneoError):
    """An s3:// location cannot be used: missing bucket or key, access denied, unreachable endpoint."""

    exit_code = 8


def pydantic_problem(e: BaseException):
    """The first problem of a pydantic ValidationError (or FastAPI's RequestValidationError) as (location, message):
    the location without FastAPI's `body` wrapper, the message without pydantic's "Value error, " prefix.
    None for any other error."""
    errors = getattr(e, "errors", None)
    if not callable(errors) or not errors():
        return None
    first = errors()[0]
    return tuple(p for p in first.get("loc", ()) if p != "body"), str(first.get("msg", "")).removeprefix("Value error, ")


def first_problem(e: BaseException) -> str:
    """One line for an error; for pydantic's, its first problem as `field.path: message`."""
    problem = pydantic_problem(e)
    if problem is None:
        return str(e)
    where = ".".join(str(p) for p in problem[0])
    return f"{where}: {problem[1]}" if where else problem[1]


def error_summary(e: BaseException, limit: int = 300) -> str:
    """`Type: first line of the message` (cut at `limit`): an exception from C++, a driver or a child process, in
    the one line a report or a warning has room for."""
    text = str(e)
    return f"{type(e).__name__}: {text.splitlines()[0][:limit] if text else ''}"
