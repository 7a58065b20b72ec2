"""A careful HTTP(S) GET on the standard library: bounded, retried, scheme-locked.

`download` fetches one URL into memory with a browser-like User-Agent, a per-attempt time limit,
a streamed size cap, and retries with exponential backoff for transient failures only
(timeouts, connection errors, 408/429/5xx; `Retry-After` is honoured up to a minute). The time
limit covers the whole body, so a server trickling bytes forever is cut off too. Only http
and https are spoken, redirects included: the opener has no file/ftp/data handlers and a
redirect to any other scheme is refused before it is followed. Failures raise `DownloadError`
with a short, countable `reason` (`http 404`, `timeout`, `connection error`, `too large`,
`bad scheme`).
"""

from __future__ import annotations

import http.client
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from urllib.parse import urljoin, urlparse

BROWSER_USER_AGENT = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/124.0.0.0 Safari/537.36"
)
_ALLOWED_SCHEMES = ("http", "https")
_CHUNK = 1 << 16
_MAX_RETRY_AFTER_S = 60.0


class DownloadError(Exception):
    """A URL could not be fetched; `reason` is short and countable, `transient` allows retry."""

    def __init__(self, reason: str, detail: str = "", transient: bool = False) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.transient = transient
        self.retry_after: float | None = None


class _SchemeLockedRedirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects only to http(s) targets; anything else is a `bad scheme` failure."""

    def http_error_302(self, req, fp, code, msg, headers):  # noqa: ANN001 - urllib's signature
        location = headers.get("location") or headers.get("uri") or ""
        target = urljoin(req.full_url, location)
        if urlparse(target).scheme.lower() not in _ALLOWED_SCHEMES:
            fp.close()
            raise DownloadError("bad scheme", f"redirect to {target[:120]}")
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


def _opener() -> urllib.request.OpenerDirector:
    opener = urllib.request.OpenerDirector()
    for handler in (
        urllib.request.ProxyHandler(),
        urllib.request.HTTPHandler(),
        urllib.request.HTTPSHandler(),
        urllib.request.HTTPDefaultErrorHandler(),
        _SchemeLockedRedirects(),
        urllib.request.HTTPErrorProcessor(),
    ):
        opener.add_handler(handler)
    return opener


def _get_once(url: str, timeout: float, max_bytes: int, user_agent: str) -> bytes:
    request = urllib.request.Request(
        url, headers={"User-Agent": user_agent, "Accept": "image/*,*/*;q=0.8"}
    )
    deadline = time.monotonic() + timeout
    with _opener().open(request, timeout=timeout) as response:
        length = response.headers.get("Content-Length")
        if length is not None and length.isdigit() and int(length) > max_bytes:
            raise DownloadError("too large", f"Content-Length {length} > {max_bytes}")
        chunks, size = [], 0
        # read1: at most one socket read per call, so a body trickled byte by byte still meets
        # the deadline (read(n) would block until n bytes arrive).
        while chunk := response.read1(_CHUNK):
            size += len(chunk)
            if size > max_bytes:
                raise DownloadError("too large", f"body over {max_bytes} bytes")
            if time.monotonic() > deadline:
                raise DownloadError("timeout", f"body not complete after {timeout}s", True)
            chunks.append(chunk)
    return b"".join(chunks)


def _classify(err: Exception) -> DownloadError:
    if isinstance(err, DownloadError):
        return err
    if isinstance(err, urllib.error.HTTPError):
        transient = err.code >= 500 or err.code in (408, 429)
        failure = DownloadError(f"http {err.code}", str(err.reason)[:120], transient)
        retry_after = err.headers.get("Retry-After") if err.headers else None
        if retry_after and retry_after.strip().isdigit():
            failure.retry_after = min(float(retry_after), _MAX_RETRY_AFTER_S)
        return failure
    reason = err.reason if isinstance(err, urllib.error.URLError) else err
    if isinstance(reason, TimeoutError):
        return DownloadError("timeout", str(reason)[:120], transient=True)
    return DownloadError("connection error", f"{type(reason).__name__}: {reason}"[:160], True)


def download(
    url: str,
    *,
    timeout: float = 30.0,
    max_bytes: int = 50 * 2**20,
    retries: int = 4,
    backoff: float = 1.0,
    user_agent: str = BROWSER_USER_AGENT,
    sleep: Callable[[float], None] = time.sleep,
) -> bytes:
    """The body of `url`, or `DownloadError` after `retries` retries of transient failures.

    Args:
        url: an http(s) URL; any other scheme raises `DownloadError("bad scheme")` at once.
        timeout: seconds per attempt: the socket timeout, and the limit for the whole body.
        max_bytes: the body is streamed and abandoned past this size (`too large`, no retry).
        retries: extra attempts after a transient failure; a 404 or other 4xx is final.
        backoff: wait before retry k (0-based) is `backoff * 2**k` (or `Retry-After`).
        user_agent: the User-Agent header (a browser's by default; some hosts refuse others).
        sleep: the wait function (injected by tests).
    """
    scheme = urlparse(url).scheme.lower()
    if scheme not in _ALLOWED_SCHEMES:
        raise DownloadError("bad scheme", f"{scheme or 'no'} scheme in {url[:120]}")
    for attempt in range(retries + 1):
        try:
            return _get_once(url, timeout, max_bytes, user_agent)
        except (DownloadError, urllib.error.URLError, http.client.HTTPException, OSError) as err:
            failure = _classify(err)
            if isinstance(err, urllib.error.HTTPError):
                err.close()  # an HTTPError holds the open response
            if not failure.transient or attempt == retries:
                raise failure from None
            wait = backoff * 2**attempt
            sleep(max(wait, failure.retry_after or 0.0))
    raise AssertionError("unreachable")
