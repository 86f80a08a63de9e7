"""ServeClient's timeouts and retries against real Serve replicas that really fail.

A tiny deployment (no model) answers ``generate_many`` and, as each request asks, dies (SIGKILL of its
own process, mid-call), stalls past the caller's timeout, or raises. Markers on disk make a fault
happen once: the retry reaches a healthy replica (a new one after a death) and gets the answer.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from pathlib import Path

import pytest

from tso.serving.client import ServeClient

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

PORT = 18701
APP = "tso-client-test"


class Flaky:
    """Answers {"texts": [request["text"]], "pid"}; ``fault`` (once per ``key``, via a marker file):
    "die" kills this replica mid-call, "stall" sleeps past any timeout; "bad" always raises; ``sleep``
    delays the answer."""

    def __init__(self, marker_dir: str):
        self.markers = Path(marker_dir)

    def _first(self, key: str) -> bool:
        marker = self.markers / key
        if marker.exists():
            return False
        marker.write_text(str(os.getpid()))
        return True

    async def generate_many(self, requests: list[dict], return_exceptions: bool = False) -> list[dict]:
        out = []
        for r in requests:
            fault = r.get("fault")
            if fault == "bad":
                raise ValueError(f"bad request {r['text']!r}")
            if fault == "die" and self._first(r["key"]):
                os.kill(os.getpid(), signal.SIGKILL)
            if fault == "stall" and self._first(r["key"]):
                await asyncio.sleep(60)
            await asyncio.sleep(r.get("sleep", 0))
            out.append({"texts": [r["text"]], "pid": os.getpid()})
        return out

    async def info(self) -> dict:
        return {"checkpoint": "none", "pid": os.getpid()}


@pytest.fixture(scope="module")
def app(ray_cluster, tmp_path_factory):
    from ray import serve

    markers = tmp_path_factory.mktemp("markers")
    serve.shutdown()
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    opts = {"ray_actor_options": {"num_cpus": 0.1}, "health_check_period_s": 1, "graceful_shutdown_timeout_s": 1}
    flaky = serve.deployment(Flaky).options(name="model-flaky", max_ongoing_requests=16, **opts)
    # one request at a time, one queued: a third concurrent call is answered with back-pressure
    narrow = serve.deployment(Flaky).options(name="model-narrow", max_ongoing_requests=1, max_queued_requests=1,
                                              **opts)

    @serve.deployment(ray_actor_options={"num_cpus": 0.1})
    class Root:
        def __init__(self, a, b):
            pass

    serve.run(Root.bind(flaky.bind(str(markers)), narrow.bind(str(markers))), name=APP, route_prefix=None)
    yield markers
    serve.delete(APP)
    serve.shutdown()


def _retries(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "tso.serving.client" and "retrying" in r.getMessage()]


def test_a_call_whose_replica_dies_mid_call_is_sent_again(app, caplog):
    caplog.set_level(logging.WARNING, logger="tso.serving.client")
    client = ServeClient(APP, chunk=2, timeout_s=120, retries=3)
    before = client.call([("model-flaky", "info", (), {})])[0]["pid"]
    requests = [("flaky", {"text": f"t{i}", "fault": "die" if i == 1 else None, "key": "die-1"}) for i in range(4)]
    out = client.generate(requests)
    assert [r["texts"] for r in out] == [["t0"], ["t1"], ["t2"], ["t3"]]
    assert (app / "die-1").read_text() == str(before)  # the first replica died in the call
    assert {r["pid"] for r in out[:2]} != {before}  # the dead replica's chunk was answered by its successor
    lines = _retries(caplog)
    assert lines and all("model-flaky.generate_many" in line and "attempt 1 of 4" in line for line in lines)
    assert any("ActorDiedError" in line or "ActorUnavailableError" in line or "RayActorError" in line
               for line in lines), lines


def test_a_call_past_its_timeout_is_sent_again(app, caplog):
    caplog.set_level(logging.WARNING, logger="tso.serving.client")
    client = ServeClient(APP, timeout_s=2, retries=1)
    start = time.monotonic()
    out = client.generate([("flaky", {"text": "slow", "fault": "stall", "key": "stall-1"})])
    assert out[0]["texts"] == ["slow"] and time.monotonic() - start < 30
    assert len(_retries(caplog)) == 1 and "TimeoutError" in _retries(caplog)[0]


def test_back_pressure_is_waited_out(app, caplog):
    caplog.set_level(logging.WARNING, logger="tso.serving.client")
    client = ServeClient(APP, chunk=1, timeout_s=60, retries=8, backoff_s=0.2, backoff_cap_s=1)
    out = client.generate([("narrow", {"text": f"n{i}", "sleep": 0.3}) for i in range(5)])
    assert [r["texts"][0] for r in out] == [f"n{i}" for i in range(5)]
    assert any("model-narrow.generate_many" in line and "BackPressureError" in line for line in _retries(caplog))


def test_errors_of_the_request_are_not_retried(app, caplog):
    caplog.set_level(logging.WARNING, logger="tso.serving.client")
    client = ServeClient(APP, timeout_s=60, retries=3)
    start = time.monotonic()
    with pytest.raises(ValueError, match="bad request 'x'"):
        client.generate([("flaky", {"text": "x", "fault": "bad"})])
    assert time.monotonic() - start < 5 and _retries(caplog) == []


def test_retries_run_out_with_the_last_error(app, caplog):
    caplog.set_level(logging.WARNING, logger="tso.serving.client")
    client = ServeClient(APP, timeout_s=0.5, retries=2, backoff_s=0.2)
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        client.generate([("flaky", {"text": "late", "sleep": 5})])
    lines = _retries(caplog)
    assert len(lines) == 2 and "attempt 1 of 3" in lines[0] and "attempt 2 of 3" in lines[1]
    assert time.monotonic() - start < 4  # 3 x 0.5 s waits + 0.2 + 0.4 s of backoff
