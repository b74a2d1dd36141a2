"""Fetching media from http(s) URLs a client names, only from hosts the operator allows.

Blocking (the standard library's urllib): the Frontend runs it on its media worker pool. Every hop of a
redirect must stay on the allow-list, the body is read in chunks and refused once over the size limit
(or as soon as a larger Content-Length is declared), and the whole fetch, connect to last byte, has
one deadline (checked between socket reads, each of which times out after the same limit). Every
failure is a `MediaError` naming the part; the message never echoes the response.
"""

from __future__ import annotations

import http.client
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Collection
from typing import IO, Any

from gemma4.media.inputs import MediaError

MAX_REDIRECTS = 3
_CHUNK = 64 * 1024


def url_host(url: str) -> str | None:
    """The lower-case host of an http(s) URL, or None when `url` is not one."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        return None
    return parsed.hostname.lower()


def check_media_url(url: str, hosts: Collection[str], where: str) -> None:
    """Refuse a URL that is not http(s) on an allowed host (before anything is fetched)."""
    host = url_host(url)
    if host is None:
        raise MediaError(where, "expected a data: URL or an http(s) URL")
    if host not in hosts:
        allowed = "; only data: URLs are accepted" if not hosts else " (limits.media_url_hosts)"
        raise MediaError(where, f"media URLs on host {host!r} are not allowed{allowed}")


class _AllowListRedirects(urllib.request.HTTPRedirectHandler):
    """Follows at most MAX_REDIRECTS redirects, each to an allowed http(s) host."""

    max_redirections = MAX_REDIRECTS

    def __init__(self, hosts: Collection[str], where: str) -> None:
        super().__init__()
        self.hosts = hosts
        self.where = where

    def redirect_request(
        self, req: urllib.request.Request, fp: IO[bytes], code: int, msg: str, headers: Any, newurl: str
    ) -> urllib.request.Request | None:
        host = url_host(newurl)
        if host is None or host not in self.hosts:
            target = host or "a non-http(s) URL"
            raise MediaError(self.where, f"the media URL redirects to {target!r}, not an allowed host")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def fetch_media_url(
    url: str, *, where: str, hosts: Collection[str], timeout_s: float, max_bytes: int
) -> tuple[bytes, str | None]:
    """The body and Content-Type (without parameters) of `url`; MediaError on any failure or limit."""
    check_media_url(url, hosts, where)
    deadline = time.monotonic() + timeout_s
    opener = urllib.request.build_opener(_AllowListRedirects(hosts, where))
    request = urllib.request.Request(url, headers={"Accept": "image/*, audio/*, video/*"})
    try:
        with opener.open(request, timeout=timeout_s) as response:
            declared = response.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > max_bytes:
                raise MediaError(where, f"the media URL's body has {declared} bytes, over the limit of {max_bytes}")
            body = _read_bounded(response, where, deadline, max_bytes)
            content_type = response.headers.get_content_type() if response.headers.get("Content-Type") else None
    except MediaError:
        raise
    except urllib.error.HTTPError as exc:
        raise MediaError(where, f"fetching the media URL failed with HTTP status {exc.code}") from None
    except (urllib.error.URLError, http.client.HTTPException, socket.timeout, TimeoutError, OSError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        raise MediaError(where, f"fetching the media URL failed: {reason}") from None
    return body, content_type


def _read_bounded(response: Any, where: str, deadline: float, max_bytes: int) -> bytes:
    """The body, read as it arrives (read1: one socket read each, so a slow sender meets the deadline)."""
    chunks, size = [], 0
    while chunk := response.read1(_CHUNK):
        size += len(chunk)
        if size > max_bytes:
            raise MediaError(where, f"the media URL's body exceeds the limit of {max_bytes} bytes")
        if time.monotonic() > deadline:
            raise MediaError(where, "fetching the media URL took longer than limits.media_url_timeout_s")
        chunks.append(chunk)
    return b"".join(chunks)
