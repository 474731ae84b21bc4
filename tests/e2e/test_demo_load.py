"""The demo's live load generator against a real (tiny, local) HTTP server: no Ray needed."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from tidal.demo.live_load import LiveLoad


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 - the http.server API
        length = int(self.headers.get("content-length", 0))
        self.rfile.read(length)
        code = 503 if self.server.fail_every and self.server.count % self.server.fail_every == 0 else 200
        self.server.count += 1
        self.send_response(code)
        self.send_header("content-type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"predictions": [0]}')

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.count = 0
    srv.fail_every = 0
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_live_load_sends_every_scheduled_request_and_streams_the_records_back(server):
    url = f"http://127.0.0.1:{server.server_address[1]}/v1/predict"
    load = LiveLoad(url, [(0.0, 40.0), (0.5, 120.0), (1.0, 0.0)], 1.0, seed=1)
    expected = len(load.arrivals_s)
    load.start()
    assert load.wait(timeout_s=60), "the load did not finish"
    records = load.records()
    assert len(records) == expected == server.count
    assert all(r.status == 200 for r in records)
    assert load.summary()["ok"] == expected
    # The spike window's arrivals are denser than the base window's (Poisson at 3x the rate).
    assert sum(1 for t in load.arrivals_s if t >= 0.5) > sum(1 for t in load.arrivals_s if t < 0.5)


def test_live_load_records_failed_requests_with_their_status(server):
    server.fail_every = 2
    url = f"http://127.0.0.1:{server.server_address[1]}/v1/predict"
    load = LiveLoad(url, [(0.0, 50.0), (0.6, 0.0)], 0.6, seed=2)
    load.start()
    assert load.wait(timeout_s=60)
    statuses = sorted({r.status for r in load.records()})
    assert statuses == [200, 503]
    assert load.summary()["errors"] == sum(1 for r in load.records() if r.status == 503)


def test_live_load_stops_early_when_asked(server):
    url = f"http://127.0.0.1:{server.server_address[1]}/v1/predict"
    load = LiveLoad(url, [(0.0, 20.0), (600.0, 0.0)], 600.0, seed=3)
    load.start()
    load.stop()
    assert load.done
    assert len(load.records()) < len(load.arrivals_s)


def test_live_load_refuses_a_non_loopback_url():
    with pytest.raises(ValueError, match="not loopback"):
        LiveLoad("http://example.com/v1/predict", [(0.0, 1.0)], 1.0)
