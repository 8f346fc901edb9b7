"""Every way a server can misbehave, over real HTTP on 127.0.0.1."""
import socket
from urllib.parse import quote

import pytest

from core.config import DownloadConfig
from stages.download.fetch import Fetcher, opted_out
from tests.helpers import large_jpeg

JPEG = large_jpeg((320, 240))


def fetcher(**overrides) -> Fetcher:
    settings = dict(allow_private_hosts=True, timeout=2.0, deadline=8.0, retries=2, retry_backoff=0.01)
    return Fetcher(DownloadConfig(**{**settings, **overrides}))


def test_image_is_fetched(server):
    url = server.add("a.jpg", JPEG)
    result = fetcher().fetch(url)
    assert (result.status, result.data, result.http_status, result.attempts) == ("ok", JPEG, 200, 1)


@pytest.mark.parametrize("code", [404, 410, 403, 429])
def test_4xx_is_not_retried(server, code):
    result = fetcher().fetch(f"{server.base}/status/{code}")
    assert result.status == "http_error" and result.http_status == code and f"HTTP {code}" in result.error
    assert server.count(f"/status/{code}") == 1


def test_5xx_is_retried_with_backoff_then_succeeds(server):
    server.add("a.jpg", JPEG)
    result = fetcher().fetch(f"{server.base}/flaky/2/a.jpg")
    assert result.status == "ok" and result.attempts == 3 and server.count("/flaky/2/a.jpg") == 3


def test_retries_back_off_exponentially(server):
    delays = []
    cfg = DownloadConfig(allow_private_hosts=True, retries=3, retry_backoff=0.01)
    result = Fetcher(cfg, sleep=delays.append).fetch(f"{server.base}/status/502")
    assert result.attempts == 4 and delays == [0.01, 0.02, 0.04]


def test_5xx_gives_up_after_the_retries(server):
    result = fetcher(retries=1).fetch(f"{server.base}/status/503")
    assert result.status == "http_error" and result.http_status == 503
    assert "(after 2 attempts)" in result.error and server.count("/status/503") == 2


def test_connection_reset_is_retried(server):
    server.add("a.jpg", JPEG)
    result = fetcher().fetch(f"{server.base}/reset/1/a.jpg")
    assert result.status == "ok" and result.attempts == 2


def test_socket_timeout_is_retried(server):
    server.add("a.jpg", JPEG)
    result = fetcher(timeout=0.3).fetch(f"{server.base}/silent/1/a.jpg")
    assert result.status == "ok" and result.attempts == 2


def test_slow_drip_body_hits_the_total_deadline(server):
    # Each byte arrives well within the socket timeout; only the total deadline can stop this download.
    result = fetcher(timeout=2.0, deadline=1.0).fetch(f"{server.base}/drip")
    assert result.status == "timeout" and "total deadline of 1 s exceeded" in result.error
    assert server.count("/drip") == 1  # a spent deadline leaves no time for a retry
    assert server.client_hung_up.wait(10)


def test_slow_drip_headers_hit_the_total_deadline(server):
    result = fetcher(timeout=2.0, deadline=1.0).fetch(f"{server.base}/drip-headers")
    assert result.status == "timeout" and "total deadline" in result.error
    # The client hung up while the server was still dripping (the server drips for 20 s at most).
    assert server.client_hung_up.wait(10)


def test_endless_body_is_capped(server):
    result = fetcher(max_bytes=1 << 20).fetch(f"{server.base}/endless")
    assert result.status == "too_large" and "max_bytes=1048576" in result.error


def test_huge_content_length_is_refused_before_reading(server):
    result = fetcher().fetch(f"{server.base}/huge-length")
    assert result.status == "too_large" and "Content-Length 1000000000000" in result.error


def test_html_page_is_not_an_image(server):
    url = server.add("page.jpg", b"<html>hello</html>", content_type="text/html; charset=utf-8")
    result = fetcher().fetch(url)
    assert result.status == "not_an_image" and "'text/html'" in result.error


def test_redirects_are_followed(server):
    server.add("chain-target", JPEG)
    assert fetcher().fetch(f"{server.base}/chain/3").status == "ok"


def test_redirect_loop_and_too_many_redirects(server):
    loop = fetcher().fetch(f"{server.base}/loop/A")
    assert loop.status == "redirect_error" and "redirect loop" in loop.error
    server.add("chain-target", JPEG)
    chain = fetcher(max_redirects=3).fetch(f"{server.base}/chain/5")
    assert chain.status == "redirect_error" and "more than 3 redirects" in chain.error


@pytest.mark.parametrize("url", ["ftp://example.com/a.jpg", "file:///etc/passwd", "data:image/png;base64,AAAA",
                                 "javascript:alert(1)"])
def test_other_schemes_are_refused(url):
    result = fetcher().fetch(url)
    assert result.status == "unsupported_scheme" and "is not http or https" in result.error


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "10.1.2.3", "192.168.0.10", "169.254.169.254", "[::1]",
                                  "[fe80::1]", "0.0.0.0"])
def test_private_hosts_are_refused_without_connecting(host):
    # Refused at resolution: nothing is ever sent to these addresses.
    result = fetcher(allow_private_hosts=False).fetch(f"http://{host}/a.jpg")
    assert result.status == "private_host" and "--allow-private-hosts" in result.error


def test_private_host_reached_through_a_redirect_is_refused(server):
    # The server itself is trusted by name (host:port); where it redirects is checked again.
    allowed = [f"127.0.0.1:{server.server_address[1]}"]
    server.add("a.jpg", JPEG)
    assert fetcher(allow_private_hosts=False, allowed_hosts=allowed).fetch(f"{server.base}/file/a.jpg").status == "ok"
    for target in ["http://169.254.169.254/latest/meta-data", "http://10.0.0.1/a.jpg", "http://127.0.0.1:9/a.jpg",
                   "http://localhost/a.jpg"]:
        result = fetcher(allow_private_hosts=False, allowed_hosts=allowed).fetch(
            f"{server.base}/redirect?to={quote(target, safe='')}")
        assert result.status == "private_host", target


def test_dns_is_checked_per_hop_with_the_resolved_address():
    # A public-looking name that resolves to loopback is refused: the check is on the address, not the name.
    def resolve(host, port, type=0):
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]

    result = Fetcher(DownloadConfig(), resolve=resolve).fetch("http://images.example.com/a.jpg")
    assert result.status == "private_host" and "127.0.0.1" in result.error


@pytest.mark.parametrize("value", ["noai", "noimageai", "noindex, noai", "NOIMAGEAI", "4m-data-engine: noai"])
def test_x_robots_tag_opt_out_is_respected(server, value):
    url = server.add("a.jpg", JPEG, X_Robots_Tag=value)
    result = fetcher().fetch(url)
    assert result.status == "opted_out" and value in result.error


def test_x_robots_tag_for_other_agents_or_other_directives_is_ignored(server):
    assert not opted_out(["otherbot: noai", "noindex", "unavailable_after: 25 Jun 2030 15:00:00 PST"])
    url = server.add("a.jpg", JPEG, X_Robots_Tag="noindex, nofollow")
    assert fetcher().fetch(url).status == "ok"
    url = server.add("b.jpg", JPEG, X_Robots_Tag="noai")
    assert fetcher(respect_opt_out=False).fetch(url).status == "ok"


def test_https_checks_the_certificate_against_the_url_host(tls_server):
    tls_server.add("a.jpg", JPEG)
    port = tls_server.server_address[1]
    result = fetcher(ca_bundle=tls_server.ca_bundle).fetch(f"https://localhost:{port}/file/a.jpg")
    assert (result.status, result.data) == ("ok", JPEG)
    # The certificate names 'localhost', not the address we connect to: refused by name, not retried.
    by_address = fetcher(ca_bundle=tls_server.ca_bundle).fetch(f"https://127.0.0.1:{port}/file/a.jpg")
    assert by_address.status == "network_error" and "TLS error" in by_address.error and by_address.attempts == 1
    untrusted = fetcher().fetch(f"https://localhost:{port}/file/a.jpg")
    assert untrusted.status == "network_error" and "CERTIFICATE_VERIFY_FAILED" in untrusted.error
