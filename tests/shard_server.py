"""A loopback HTTP server for shard tests: serves one folder on 127.0.0.1 (a free port), and can
drop the connection part-way through chosen files, as a flaky object store does."""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class _Handler(SimpleHTTPRequestHandler):
    drop_after: dict[str, int] = {}  # file name -> bytes sent before the connection is cut
    drop_times: int | None = None  # cut only the first this many requests of each file (None: all)
    requests: list[str]

    def log_message(self, *args: object) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        name = self.path.rsplit("/", 1)[-1]
        self.requests.append(name)
        cut = self.drop_after.get(name)
        if self.drop_times is not None and self.requests.count(name) > self.drop_times:
            cut = None
        if cut is None:
            super().do_GET()
            return
        data = (Path(self.directory) / name).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))  # promises the whole file ...
        self.end_headers()
        self.wfile.write(data[:cut])  # ... and stops part-way
        self.wfile.flush()
        self.close_connection = True


@contextmanager
def serve_folder(
    folder: Path, drop_after: dict[str, int] | None = None, drop_times: int | None = None
) -> Iterator[tuple[str, list[str]]]:
    """(base URL, the names requested so far) while the server runs; stopped on exit."""
    requests: list[str] = []
    attributes = {"drop_after": drop_after or {}, "drop_times": drop_times, "requests": requests}
    handler = type("Handler", (_Handler,), attributes)
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
