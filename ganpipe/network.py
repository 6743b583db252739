"""Time limits for every network call ganpipe makes, and one readable error when an endpoint fails.

ganpipe talks to S3 (s3fs, aiobotocore), MLflow's tracking server (requests), the Prefect API
(httpx) and the Hugging Face hub (huggingface_hub, datasets). Left to their defaults these wait
minutes on an endpoint that accepts connections and never answers, and their retry layers
multiply: s3fs retries botocore's retries, datasets retries both, and a Prefect task retries all
of it. The budget here bounds that:

- `timeout_s` (config `storage.timeout_s`, else $GANPIPE_NETWORK_TIMEOUT, else 30) is how long
  one request may go unanswered in all, retries included: each of its attempts gets
  `timeout_s / attempts` to connect and to wait for each read.
- `retries` (`storage.retries`, else $GANPIPE_NETWORK_RETRIES, else 2) is how often a failed
  request is tried again, with a short backoff: a refused connection, a reset, a 5xx, throttling
  or a timeout.
- Exactly one layer per client retries (botocore for S3, urllib3 for MLflow, Prefect's client,
  huggingface_hub); the layers above it make one attempt.

The budget travels to child processes (training ranks, export workers) through the environment.
A library's own setting (MLFLOW_HTTP_REQUEST_TIMEOUT, PREFECT_API_REQUEST_TIMEOUT, ...) set by
the user wins over the budget for that library.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from ganpipe.errors import Failure, UserError

DEFAULT_TIMEOUT_S = 30.0
DEFAULT_RETRIES = 2
TIMEOUT_VARIABLE = "GANPIPE_NETWORK_TIMEOUT"
RETRIES_VARIABLE = "GANPIPE_NETWORK_RETRIES"
MAX_RETRIES = 10
MAX_TIMEOUT_S = 3600.0

# Each library's own timeout setting: set from the budget unless the user set it (then it wins,
# and the error message names it).
SERVICE_TIMEOUT_VARIABLE = {"MLflow tracking server": "MLFLOW_HTTP_REQUEST_TIMEOUT",
                            "Prefect API": "PREFECT_API_REQUEST_TIMEOUT",
                            "Hugging Face hub": "HF_HUB_DOWNLOAD_TIMEOUT"}
LIBRARY_VARIABLES = ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
                     "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER",
                     "PREFECT_API_REQUEST_TIMEOUT", "PREFECT_CLIENT_MAX_RETRIES",
                     "HF_HUB_ETAG_TIMEOUT", "HF_HUB_DOWNLOAD_TIMEOUT")
# Those ganpipe set are listed here, so that a child process, which inherits them, tells them from
# the user's own and derives them again from the budget it inherits with them.
DERIVED_VARIABLE = "GANPIPE_NETWORK_DERIVED"
USER_SET = frozenset(set(LIBRARY_VARIABLES) & set(os.environ) - set(os.environ.get(DERIVED_VARIABLE, "").split(",")))


@dataclass(frozen=True)
class Budget:
    """How long a request may go unanswered, and how often it is retried (module doc)."""

    timeout_s: float = DEFAULT_TIMEOUT_S
    retries: int = DEFAULT_RETRIES

    @property
    def attempts(self) -> int:
        return self.retries + 1

    @property
    def attempt_timeout(self) -> float:
        """Connect and read timeout of one attempt: the attempts together stay within timeout_s."""
        return self.timeout_s / self.attempts

    @property
    def attempt_timeout_whole(self) -> int:
        """The same in whole seconds (at least 1), for the libraries that read an integer."""
        return max(1, math.floor(self.attempt_timeout))


def budget() -> Budget:
    """The budget in force: $GANPIPE_NETWORK_TIMEOUT / $GANPIPE_NETWORK_RETRIES (a config's
    storage keys put theirs there, see `use`), else the defaults."""
    return Budget(_from_env(TIMEOUT_VARIABLE, float, DEFAULT_TIMEOUT_S, 0.0, MAX_TIMEOUT_S),
                  _from_env(RETRIES_VARIABLE, int, DEFAULT_RETRIES, -1, MAX_RETRIES))


def _from_env(variable: str, kind: type, default: Any, above: float, at_most: float) -> Any:
    text = os.environ.get(variable, "").strip()
    if not text:
        return default
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not (above < value <= at_most):
        raise UserError(f"{variable}: expected a {kind.__name__} in ({above:g}, {at_most:g}], got {text[:40]!r}")
    return value


def use(timeout_s: float | None = None, retries: int | None = None) -> Budget:
    """Put a config's budget (None: keep the environment's or the default) in force for this
    process and its children, and hand it to MLflow, Prefect and the hub through their own
    settings. Call before Prefect or huggingface_hub is imported: both read them on import."""
    if timeout_s is not None:
        os.environ[TIMEOUT_VARIABLE] = f"{timeout_s:g}"
    if retries is not None:
        os.environ[RETRIES_VARIABLE] = str(retries)
    chosen = budget()
    whole = str(chosen.attempt_timeout_whole)
    settings = {
        # urllib3 under MLflow: retries with backoff factor x 2^(n-1) s (the first retry at once).
        "MLFLOW_HTTP_REQUEST_TIMEOUT": whole, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(chosen.retries),
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
        "HF_HUB_ETAG_TIMEOUT": whole, "HF_HUB_DOWNLOAD_TIMEOUT": whole,
    }
    if os.environ.get("PREFECT_API_URL"):
        # Prefect's client backs off 2^n s between its retries. Without PREFECT_API_URL it talks to
        # the temporary API it starts itself, on a machine that may be busy: its own limits stay.
        settings |= {"PREFECT_API_REQUEST_TIMEOUT": f"{chosen.attempt_timeout:g}",
                     "PREFECT_CLIENT_MAX_RETRIES": str(chosen.retries)}
    derived = [variable for variable in settings if variable not in USER_SET]
    for variable in derived:
        os.environ[variable] = settings[variable]
    os.environ[DERIVED_VARIABLE] = ",".join(derived)
    return chosen


def botocore_config() -> dict[str, Any]:
    """botocore Config arguments for S3 clients (s3fs `config_kwargs`): the budget's timeouts, and
    botocore's standard retry mode as the one retry layer (s3fs's own is switched off, storage.py)."""
    chosen = budget()
    return {"connect_timeout": chosen.attempt_timeout, "read_timeout": chosen.attempt_timeout,
            "retries": {"total_max_attempts": chosen.attempts, "mode": "standard"}}


class EndpointBreaker:
    """An httpx transport around another, for clients whose retries cannot be configured
    (huggingface_hub retries a failed file lookup 5 more times with a 60 s timeout of its own).
    It caps every attempt's timeouts at the budget's, and once one origin has failed `attempts`
    times in a row it fails further requests to it at once, with the one-line error: a silent
    endpoint then costs one budget, whatever the layers above retry. An answer resets the count."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.failures: dict[str, int] = {}
        self.last_error: dict[str, BaseException] = {}

    def handle_request(self, request: Any) -> Any:
        chosen = budget()
        origin = _origin(str(request.url))
        if self.failures.get(origin, 0) >= chosen.attempts:
            raise unreachable(self.last_error[origin], origin) or Unreachable(f"{origin} did not answer")
        given = request.extensions.get("timeout") or {}
        request.extensions["timeout"] = {kind: min(given.get(kind) or math.inf, chosen.attempt_timeout)
                                         for kind in ("connect", "read", "write", "pool")}
        try:
            response = self.inner.handle_request(request)
        except Exception as exc:
            if _failed(list(_chain(exc))):
                self.failures[origin] = self.failures.get(origin, 0) + 1
                self.last_error[origin] = exc
            raise
        self.failures.pop(origin, None)
        return response

    def close(self) -> None:
        self.inner.close()

    def __enter__(self) -> EndpointBreaker:
        self.inner.__enter__()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.inner.__exit__(*exc_info)


# --- one error line for a failed endpoint ------------------------------------------------------------

class Unreachable(Failure):
    """An endpoint did not answer or refused: the environment's failure (exit 1), named."""


# Exception classes by (top-level module, class name) anywhere in the class's MRO: matching by name
# needs none of these libraries imported, and covers their private submodules.
TIMEOUTS = {("botocore", "ReadTimeoutError"), ("botocore", "ConnectTimeoutError"), ("requests", "Timeout"),
            ("urllib3", "TimeoutError"), ("httpx", "TimeoutException"), ("httpx2", "TimeoutException"),
            ("aiohttp", "ServerTimeoutError"), ("builtins", "TimeoutError")}
CONNECTION_ERRORS = {("botocore", "ConnectionError"), ("botocore", "HTTPClientError"), ("requests", "ConnectionError"),
                     ("urllib3", "NewConnectionError"), ("urllib3", "ProtocolError"), ("httpx", "NetworkError"),
                     ("httpx2", "NetworkError"), ("httpx", "RemoteProtocolError"), ("httpx2", "RemoteProtocolError"),
                     ("aiohttp", "ClientConnectionError"), ("builtins", "ConnectionError")}
URL = re.compile(r"\bhttps?://[^\s\"'<>()\\]+")


def _is(exc: BaseException, names: set[tuple[str, str]]) -> bool:
    return any((cls.__module__.split(".")[0], cls.__name__) in names for cls in type(exc).__mro__)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and everything it wraps: causes, contexts, urllib3's `reason`, a StageError's cause,
    exceptions passed as arguments (requests wraps urllib3's that way)."""
    seen: set[int] = set()
    todo: list[Any] = [exc]
    while todo:
        current = todo.pop(0)
        if not isinstance(current, BaseException) or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        # A context the raiser suppressed (`raise ... from None`) is not the cause.
        context = None if current.__suppress_context__ else current.__context__
        todo += [current.__cause__, context, getattr(current, "reason", None),
                 getattr(current, "cause", None), *current.args]


def _url_of(exc: BaseException) -> str | None:
    kwargs = getattr(exc, "kwargs", None)  # botocore errors carry the endpoint they were talking to
    if isinstance(kwargs, dict) and kwargs.get("endpoint_url"):
        return str(kwargs["endpoint_url"])
    try:  # requests and httpx errors carry their request (httpx raises when it has none)
        request = getattr(exc, "request", None)
        if request is not None and getattr(request, "url", None):
            return str(request.url)
    except RuntimeError:
        pass
    pool = getattr(exc, "pool", None)  # urllib3
    if pool is not None and getattr(pool, "host", None):
        return f"{pool.scheme}://{pool.host}:{pool.port}"
    found = URL.search(str(exc))
    return found.group(0) if found else None


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}" if parts.scheme and parts.netloc else url


def _service(origin: str, from_botocore: bool) -> str:
    if from_botocore:
        return "S3 endpoint"
    configured = {"MLflow tracking server": ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"),
                  "Prefect API": ("PREFECT_API_URL",),
                  "Hugging Face hub": ("HF_ENDPOINT",),
                  "S3 endpoint": ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "MLFLOW_S3_ENDPOINT_URL")}
    for service, variables in configured.items():
        if any(os.environ.get(v) and _origin(os.environ[v]) == origin for v in variables):
            return service
    if origin.endswith(("huggingface.co", "hf.co")):
        return "Hugging Face hub"
    return "endpoint"


def _failed(chain: list[BaseException]) -> str | None:
    """"timeout" or "connection" when the chain holds such an error, else None."""
    if any(_is(e, TIMEOUTS) for e in chain):
        return "timeout"
    return "connection" if any(_is(e, CONNECTION_ERRORS) for e in chain) else None


def unreachable(exc: BaseException, url: str | None = None) -> Unreachable | None:
    """The one-line failure for `exc` when it comes from an endpoint (at `url`, else the address
    the errors carry) that timed out or could not be reached, whatever wraps it, naming the
    endpoint and the budget; else None."""
    chain = list(_chain(exc))
    named = next((e for e in chain if isinstance(e, Unreachable)), None)
    if named is not None:
        return named
    failed = _failed(chain)
    url = url or next((u for u in map(_url_of, chain) if u), None) if failed else None
    if url is None:  # not a network failure, or a local one (a lock's timeout, a broken pipe)
        return None
    origin = _origin(url)
    service = _service(origin, any(type(e).__module__.startswith("botocore") for e in chain))
    if failed == "connection":
        refused = any(isinstance(e, ConnectionRefusedError) or "connection refused" in str(e).lower() for e in chain)
        why = "connection refused" if refused else _short([e for e in chain if _is(e, CONNECTION_ERRORS)][-1])
        return Unreachable(f"{service} {origin} could not be reached ({why})")
    chosen = budget()
    own = SERVICE_TIMEOUT_VARIABLE.get(service)
    if own in USER_SET:
        return Unreachable(f"{service} {origin} did not answer ({own}={os.environ.get(own)} s per attempt)")
    return Unreachable(f"{service} {origin} did not answer within {chosen.timeout_s:g} s ({chosen.attempts} "
                       f"attempt(s); storage.timeout_s={chosen.timeout_s:g}, storage.retries={chosen.retries})")


def _short(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return text if len(text) <= 200 else text[:200] + "..."


def reraise_if_unreachable(exc: BaseException) -> None:
    """For handlers that treat a failed call as an answer ("no such run"): a network failure is
    not one, and trying further calls would spend the budget again."""
    failure = unreachable(exc)
    if failure is not None:
        raise failure from exc
