"""Fetching one URL safely: every failure comes back as a value with a status and a message naming the cause.

Why stdlib `http.client` and not requests/urllib3: each redirect hop must be resolved, checked against the
private-address policy and then connected to *that checked address* (so DNS cannot answer differently
between the check and the connection), and a whole download must end at a deadline even when a server
drips one byte at a time. Both need control of the socket that the high-level clients hide.
"""
from __future__ import annotations

import heapq
import http.client
import ipaddress
import itertools
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

from core.config import DownloadConfig

REDIRECT_CODES = {301, 302, 303, 307, 308}
OPT_OUT_DIRECTIVES = {"noai", "noimageai"}
# X-Robots-Tag directives; a "name:" prefix that is not one of these names a user agent.
ROBOTS_DIRECTIVES = {
    "all", "noindex", "nofollow", "none", "noarchive", "nosnippet", "notranslate", "noimageindex",
    "unavailable_after", "max-snippet", "max-image-preview", "max-video-preview", "indexifembedded",
    *OPT_OUT_DIRECTIVES,
}
USER_AGENT_TOKEN = "4m-data-engine"
CHUNK = 1 << 16


@dataclass
class FetchResult:
    status: str  # "ok" or the failure reason
    data: bytes | None = None
    error: str | None = None
    http_status: int | None = None
    final_url: str | None = None
    attempts: int = 0


class FetchError(Exception):
    def __init__(self, status: str, message: str, http_status: int | None = None, retryable: bool = False):
        super().__init__(message)
        self.status, self.message, self.http_status, self.retryable = status, message, http_status, retryable


class DeadlineWatchdog:
    """Shuts down sockets whose download deadline has passed.

    A per-socket timeout restarts with every byte, so a server that drips bytes (in the headers or the body)
    would hold a thread forever; shutting the socket down from here unblocks whatever read is waiting on it.
    """

    def __init__(self):
        self._heap: list[tuple[float, int, socket.socket]] = []
        self._live: set[int] = set()
        self._ids = itertools.count()
        self._cv = threading.Condition()
        threading.Thread(target=self._run, name="download-deadlines", daemon=True).start()

    def watch(self, sock: socket.socket, deadline: float) -> int:
        with self._cv:
            ticket = next(self._ids)
            heapq.heappush(self._heap, (deadline, ticket, sock))
            self._live.add(ticket)
            self._cv.notify()
            return ticket

    def release(self, ticket: int) -> None:
        with self._cv:
            self._live.discard(ticket)

    def _run(self) -> None:
        with self._cv:
            while True:
                while self._heap and self._heap[0][1] not in self._live:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._cv.wait()
                    continue
                deadline, ticket, sock = self._heap[0]
                wait = deadline - time.monotonic()
                if wait > 0:
                    self._cv.wait(wait)
                    continue
                heapq.heappop(self._heap)
                self._live.discard(ticket)
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass  # already closed


_WATCHDOG: DeadlineWatchdog | None = None
_WATCHDOG_LOCK = threading.Lock()


def _watchdog() -> DeadlineWatchdog:
    global _WATCHDOG
    with _WATCHDOG_LOCK:
        if _WATCHDOG is None:
            _WATCHDOG = DeadlineWatchdog()
        return _WATCHDOG


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Connects to an address resolved and checked beforehand; the Host header keeps the real name."""

    def __init__(self, host: str, port: int, address: str, timeout: float, on_socket):
        super().__init__(host, port, timeout=timeout)
        self._address, self._on_socket = address, on_socket

    def _open(self) -> socket.socket:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._on_socket(sock)
        return sock

    def connect(self) -> None:
        self.sock = self._open()


class _PinnedHTTPSConnection(_PinnedHTTPConnection):
    default_port = 443

    def __init__(self, host: str, port: int, address: str, timeout: float, on_socket, tls: ssl.SSLContext):
        super().__init__(host, port, address, timeout, on_socket)
        self._tls = tls

    def connect(self) -> None:
        # The certificate is checked against the URL's host name, whatever address we connected to.
        self.sock = self._tls.wrap_socket(self._open(), server_hostname=self.host)
        self._on_socket(self.sock)  # the TLS socket replaces the raw one for reads from here on


def opted_out(robots_values: list[str]) -> bool:
    """True when an X-Robots-Tag header says noai/noimageai for every agent or for this one."""
    for value in robots_values:
        agent = None
        head, sep, rest = value.partition(":")
        if sep and head.strip().lower() not in ROBOTS_DIRECTIVES:
            agent, value = head.strip().lower(), rest
        if agent not in (None, "*", USER_AGENT_TOKEN):
            continue
        if {d.strip().lower() for d in value.split(",")} & OPT_OUT_DIRECTIVES:
            return True
    return False


def _is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if ip.version == 6 and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


class Fetcher:
    """Downloads URLs under one `DownloadConfig`; thread-safe, one instance per shard task."""

    def __init__(self, cfg: DownloadConfig, resolve=socket.getaddrinfo, sleep=time.sleep):
        self.cfg = cfg
        self._resolve, self._sleep = resolve, sleep
        self._tls = ssl.create_default_context(cafile=cfg.ca_bundle)
        self._allowed = {h.lower() for h in cfg.allowed_hosts}
        self._headers = {"User-Agent": cfg.user_agent, "Accept": "image/*,*/*;q=0.5", "Connection": "close"}

    def fetch(self, url: str) -> FetchResult:
        cfg = self.cfg
        deadline = time.monotonic() + cfg.deadline
        delay = cfg.retry_backoff
        attempt = 0
        while True:
            attempt += 1
            try:
                data, http_status, final_url = self._fetch_once(url, deadline)
                return FetchResult("ok", data, None, http_status, final_url, attempt)
            except FetchError as err:
                last = err
            if not last.retryable or attempt > cfg.retries or time.monotonic() + delay >= deadline:
                break
            self._sleep(delay)  # exponential backoff between attempts
            delay *= 2
        note = f" (after {attempt} attempts)" if attempt > 1 else ""
        return FetchResult(last.status, None, last.message + note, last.http_status, None, attempt)

    # -- one attempt, following redirects ------------------------------------------------------------
    def _fetch_once(self, url: str, deadline: float) -> tuple[bytes, int, str]:
        seen = {url}
        current = url
        for _ in range(self.cfg.max_redirects + 1):
            status, location, body = self._request(current, deadline)
            if location is None:
                return body, status, current
            target = urljoin(current, location)
            if target in seen:
                raise FetchError("redirect_error", f"redirect loop: {current!r} redirects back to {target!r}", status)
            seen.add(target)
            current = target
        raise FetchError("redirect_error", f"more than {self.cfg.max_redirects} redirects, last to {current!r}")

    def _check_host(self, parts, url: str) -> tuple[str, int, str]:
        if parts.scheme not in ("http", "https"):
            raise FetchError("unsupported_scheme", f"scheme {parts.scheme!r} of {url[:200]!r} is not http or https")
        host = parts.hostname
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise FetchError("invalid_url", f"bad port in {url[:200]!r}") from None
        if not host:
            raise FetchError("invalid_url", f"no host in {url[:200]!r}")
        try:
            infos = self._resolve(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as err:
            raise FetchError("dns_error", f"cannot resolve {host!r}: {err.strerror}",
                             retryable=err.errno == socket.EAI_AGAIN) from None
        addresses = [info[4][0] for info in infos]
        if not addresses:
            raise FetchError("dns_error", f"{host!r} resolves to no address")
        if self.cfg.allow_private_hosts or host.lower() in self._allowed or f"{host.lower()}:{port}" in self._allowed:
            return host, port, addresses[0]
        public = [a for a in addresses if _is_public(a)]
        if not public:
            raise FetchError("private_host", f"host {host!r} resolves to non-public address {addresses[0]} "
                             "(loopback, private or link-local; pass --allow-private-hosts to allow)")
        return host, port, public[0]

    def _request(self, url: str, deadline: float) -> tuple[int, str | None, bytes]:
        cfg = self.cfg
        parts = urlsplit(url)
        host, port, address = self._check_host(parts, url)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise FetchError("timeout", f"total deadline of {cfg.deadline:g} s exceeded before connecting")
        watchdog, tickets, sockets = _watchdog(), [], []

        def on_socket(sock: socket.socket) -> None:
            sockets.append(sock)
            tickets.append(watchdog.watch(sock, deadline))

        timeout = min(cfg.timeout, remaining)
        if parts.scheme == "https":
            conn = _PinnedHTTPSConnection(host, port, address, timeout, on_socket, self._tls)
        else:
            conn = _PinnedHTTPConnection(host, port, address, timeout, on_socket)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        received = 0
        try:
            conn.request("GET", path, headers=self._headers)
            response = conn.getresponse()
            status = response.status
            if status in REDIRECT_CODES:
                location = response.getheader("Location")
                if not location:
                    raise FetchError("redirect_error", f"HTTP {status} without a Location header", status)
                return status, location, b""
            if 400 <= status < 500:
                raise FetchError("http_error", f"HTTP {status} {response.reason}", status)
            if status >= 500:
                raise FetchError("http_error", f"HTTP {status} {response.reason}", status, retryable=True)
            if status != 200:
                raise FetchError("http_error", f"unexpected HTTP {status} {response.reason}", status)
            if cfg.respect_opt_out and opted_out(response.msg.get_all("X-Robots-Tag") or []):
                raise FetchError("opted_out", "X-Robots-Tag: " + "; ".join(response.msg.get_all("X-Robots-Tag")), status)
            content_type = (response.getheader("Content-Type") or "").split(";")[0].strip().lower()
            if content_type in ("text/html", "text/plain", "application/json", "application/xhtml+xml"):
                raise FetchError("not_an_image", f"served as {content_type!r}, not an image", status)
            length = response.getheader("Content-Length")
            if length and length.isdigit() and int(length) > cfg.max_bytes:
                raise FetchError("too_large", f"Content-Length {length} exceeds max_bytes={cfg.max_bytes}", status)
            chunks = []
            while True:
                if time.monotonic() >= deadline:
                    raise FetchError("timeout", f"total deadline of {cfg.deadline:g} s exceeded "
                                     f"after {received} bytes", status)
                # http.client lets go of conn.sock once a "Connection: close" response starts: use ours.
                sockets[-1].settimeout(max(0.001, min(cfg.timeout, deadline - time.monotonic())))
                chunk = response.read1(CHUNK)
                if not chunk:
                    break
                received += len(chunk)
                if received > cfg.max_bytes:
                    raise FetchError("too_large", f"body exceeds max_bytes={cfg.max_bytes}", status)
                chunks.append(chunk)
            if time.monotonic() >= deadline:  # the watchdog cut the body short
                raise FetchError("timeout", f"total deadline of {cfg.deadline:g} s exceeded after {received} bytes")
            return status, None, b"".join(chunks)
        except FetchError:
            raise
        except (OSError, http.client.HTTPException) as err:
            if time.monotonic() >= deadline:  # the watchdog or the last read's timeout ended it
                raise FetchError("timeout", f"total deadline of {cfg.deadline:g} s exceeded "
                                 f"after {received} bytes") from None
            if isinstance(err, TimeoutError):
                raise FetchError("timeout", f"no answer within {cfg.timeout:g} s from {host!r}",
                                 retryable=True) from None
            if isinstance(err, ssl.SSLError):
                raise FetchError("network_error", f"TLS error with {host!r}: {err.reason or err}") from None
            reason = type(err).__name__ + (f": {err}" if str(err) else "")
            raise FetchError("network_error", f"{reason} from {host!r}", retryable=True) from None
        finally:
            for ticket in tickets:
                watchdog.release(ticket)
            conn.close()
