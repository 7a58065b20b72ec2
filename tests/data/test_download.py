"""`download` against a local server: retries, backoff, final 4xx, timeouts, caps, schemes."""

from __future__ import annotations

import socket
import time

import pytest

from litovis.data.download import BROWSER_USER_AGENT, DownloadError, download


def _get(url, **kw):
    waits: list[float] = []
    kw.setdefault("backoff", 0.01)
    kw.setdefault("timeout", 2.0)
    return download(url, sleep=waits.append, **kw), waits


def _fail(url, **kw) -> tuple[DownloadError, list[float]]:
    waits: list[float] = []
    kw.setdefault("backoff", 0.01)
    kw.setdefault("timeout", 2.0)
    with pytest.raises(DownloadError) as err:
        download(url, sleep=waits.append, **kw)
    return err.value, waits


def test_ok_with_browser_user_agent(http_server):
    body, waits = _get(http_server + "/ok.png")
    assert body.startswith(b"\x89PNG") and waits == []
    assert _get(http_server + "/ua")[0].decode() == BROWSER_USER_AGENT


def test_404_is_final(http_server):
    err, waits = _fail(http_server + "/missing", retries=3)
    assert err.reason == "http 404" and not err.transient and waits == []
    assert http_server.hits["/missing"] == 1


def test_500_then_ok_is_retried(http_server):
    body, waits = _get(http_server + "/flaky", retries=2)
    assert body.startswith(b"\x89PNG") and waits == [0.01]
    assert http_server.hits["/flaky"] == 2


def test_429_is_retried(http_server):
    body, waits = _get(http_server + "/busy", retries=1)
    assert body.startswith(b"\x89PNG") and len(waits) == 1


def test_backoff_is_exponential_and_bounded_by_retries(http_server):
    err, waits = _fail(http_server + "/broken", retries=3, backoff=0.5)
    assert err.reason == "http 503" and waits == [0.5, 1.0, 2.0]
    assert http_server.hits["/broken"] == 4


def test_timeout_is_retried_then_reported(http_server):
    err, waits = _fail(http_server + "/slow", retries=1, timeout=0.2)
    assert err.reason == "timeout" and len(waits) == 1
    assert http_server.hits["/slow"] == 2


def test_size_cap(http_server):
    err, waits = _fail(http_server + "/huge", max_bytes=100_000, retries=2)
    assert err.reason == "too large" and waits == []
    err, _ = _fail(http_server + "/huge-declared", max_bytes=100_000)
    assert err.reason == "too large" and "Content-Length" in err.detail


def test_redirects_only_to_http(http_server):
    err, _ = _fail(http_server + "/to-file", retries=2)
    assert err.reason == "bad scheme" and "file:///etc/passwd" in err.detail
    assert http_server.hits["/to-file"] == 1
    assert _get(http_server + "/to-ok")[0].startswith(b"\x89PNG")


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.com/a.jpg", "data:,x", "example.com/a.jpg"])
def test_other_schemes_are_refused_without_a_request(url):
    err, waits = _fail(url)
    assert err.reason == "bad scheme" and waits == []


def test_connection_refused_is_a_retried_connection_error():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    err, waits = _fail(f"http://127.0.0.1:{port}/x.jpg", retries=1)
    assert err.reason == "connection error" and len(waits) == 1


def test_a_body_that_trickles_forever_hits_the_whole_body_deadline(http_server):
    start = time.monotonic()
    err, _ = _fail(http_server + "/trickle", retries=0, timeout=0.5)
    assert err.reason == "timeout" and "body not complete" in err.detail
    assert time.monotonic() - start < 3.0


def test_a_server_that_never_answers_times_out(http_server):
    start = time.monotonic()
    err, _ = _fail(http_server + "/silent", retries=0, timeout=0.3)
    assert err.reason == "timeout" and time.monotonic() - start < 2.5


def test_redirects_to_ftp_and_redirect_loops_end_with_a_reason(http_server):
    err, _ = _fail(http_server + "/to-ftp", retries=2)
    assert err.reason == "bad scheme" and http_server.hits["/to-ftp"] == 1
    err, _ = _fail(http_server + "/loop", retries=2)
    assert err.reason.startswith("http 30") and not err.transient
