"""The service on a real localhost socket, for the tests of the service, the edge client and
long-form inference: `ServerThread(app)` runs `serve.Service` (the same socket, limits and shutdown
as `python -m esrt_jax.serve`) in a background event loop; `wait_ready(url)`, the bearer `TOKEN`."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request

from esrt_jax import serve

TOKEN = "s3cret-token"


class ServerThread:
    """An aiohttp app on 127.0.0.1:<ephemeral> served by an event loop in a background thread."""

    def __init__(self, app):
        self.app = app
        self.service = serve.Service(app, serve.listen_socket(serve.ServeConfig(host="127.0.0.1", port=0)))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.port = self._run(self.service.start())
        self.url = f"http://127.0.0.1:{self.port}"
        self.stopped = False

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=120)

    def stop(self):
        if not self.stopped:
            self.stopped = True
            self._run(self.service.stop())
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)


def wait_ready(url: str, timeout: float = 300) -> dict:
    """Poll /healthz until the warm-up is done -> its JSON."""
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=30) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            assert e.code == 503 and json.loads(e.read())["status"] == "warming"
            assert time.time() < deadline, "warm-up did not finish"
            time.sleep(0.05)
