"""Fetching http(s) media for the OpenAI server, only from domains the operator allowed.

Off by default: a server that fetches any URL a client names can be turned against the network it
sits in. Allowed fetches have a timeout, a size cap, and follow no redirect to another host.
"""
from __future__ import annotations

import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass


@dataclass
class MediaPolicy:
    allowed_domains: tuple[str, ...] = ()  # a domain also allows its subdomains; empty: fetch nothing
    timeout_s: float = 10.0
    max_bytes: int = 32 * 1024 * 1024
    max_redirects: int = 3

    def allows(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        return any(host == d or host.endswith("." + d) for d in self.allowed_domains)


class _SameHostRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects only to the host first asked for."""

    def __init__(self, host: str, field: str, limit: int):
        self.host, self.field, self.max_redirections = host, field, limit

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        target = urllib.parse.urlsplit(urllib.parse.urljoin(req.full_url, newurl))
        if (target.hostname or "").lower() != self.host or target.scheme not in ("http", "https"):
            raise ValueError(f"{self.field}: the server redirected to {target.scheme}://{target.hostname}, another "
                             "host; redirects to other hosts are not followed")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def fetch(url: str, policy: MediaPolicy, field: str) -> tuple[bytes, str]:
    """(body, content type) of an http(s) URL the policy allows; ValueError names `field` otherwise."""
    parts = urllib.parse.urlsplit(url.strip())
    host = (parts.hostname or "").lower()
    if parts.scheme not in ("http", "https") or not host:
        raise ValueError(f"{field}: only data:, http: and https: URLs are accepted")
    if not policy.allows(host):
        raise ValueError(f"{field}: fetching media from {host} is not allowed on this server (the operator "
                         "allows domains with --allowed-media-domains); send a data: URL instead")
    opener = urllib.request.build_opener(_SameHostRedirects(host, field, policy.max_redirects))
    request = urllib.request.Request(url.strip(), headers={"User-Agent": "triton-vlm"})
    try:
        deadline = time.monotonic() + policy.timeout_s
        with opener.open(request, timeout=policy.timeout_s) as response:
            content_type = response.headers.get_content_type()
            body = _read(response, policy.max_bytes + 1, deadline, f"{field}: fetching {host}")
    except urllib.error.HTTPError as e:
        raise ValueError(f"{field}: fetching {host} failed with HTTP {e.code}") from None
    except (urllib.error.URLError, OSError) as e:  # timeouts, refused connections, bad TLS
        reason = getattr(e, "reason", e)
        raise ValueError(f"{field}: fetching {host} failed ({reason})") from None
    if len(body) > policy.max_bytes:
        raise ValueError(f"{field}: the media at {host} is larger than {policy.max_bytes} bytes (--max-media-bytes)")
    return body, content_type


def _read(response, limit: int, deadline: float, what: str) -> bytes:
    """At most `limit` bytes, in chunks: the socket timeout bounds each read, the deadline all of them."""
    chunks, size = [], 0
    while size < limit:
        if time.monotonic() > deadline:
            raise ValueError(f"{what} took longer than the timeout (--media-timeout-s)")
        chunk = response.read(min(64 * 1024, limit - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)
