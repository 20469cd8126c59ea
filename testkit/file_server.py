"""A local web server of files for the tests of downloads: http or https (a self-signed certificate for 127.0.0.1,
made with the machine's ``openssl``), counting the requests it answers, with an optional delay before a body."""

from __future__ import annotations

import http.server
import ssl
import subprocess
import threading
from collections import Counter
from pathlib import Path


class FileServer:
    """Serves ``files`` (URL path -> bytes) on 127.0.0.1; ``headers`` (path -> extra headers) may lie about the
    length, or leave it out (a value of None: the body then ends when the connection closes); ``redirects`` (path ->
    location) answer 302; ``head_status`` (path -> status) answers HEAD so, as a presigned URL signed for GET
    does; ``drip`` (path -> seconds) sends the body one byte every that many seconds; ``requests`` counts
    ``(method, path)``. ``certificate`` is the CA file a client must trust (https)."""

    def __init__(self, folder: Path, https: bool = True, delay: float = 0.0):
        self.files: dict[str, bytes] = {}
        self.headers: dict[str, dict[str, str | None]] = {}
        self.redirects: dict[str, str] = {}
        self.head_status: dict[str, int] = {}
        self.drip: dict[str, float] = {}
        self.requests: Counter = Counter()
        self.delay = delay
        self._lock = threading.Lock()
        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.owner = self
        self.certificate: Path | None = None
        if https:
            Path(folder).mkdir(parents=True, exist_ok=True)
            self.certificate, key = Path(folder) / "server.pem", Path(folder) / "server.key"
            subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                            "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key),
                            "-out", str(self.certificate)], check=True, capture_output=True, timeout=60)
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(self.certificate, key)
            self._httpd.socket = context.wrap_socket(self._httpd.socket, server_side=True)
        scheme = "https" if https else "http"
        self.url = f"{scheme}://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self) -> FileServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def count(self, method: str, path: str) -> int:
        with self._lock:
            return self.requests[(method, path)]


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:  # quiet
        pass

    def _answer(self, body: bool) -> None:
        server: FileServer = self.server.owner
        path = self.path.split("?")[0]
        with server._lock:
            server.requests[(self.command, path)] += 1
        if path in server.redirects:
            self.send_response(302)
            self.send_header("Location", server.redirects[path])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if not body and path in server.head_status:
            self.send_error(server.head_status[path])
            return
        data = server.files.get(path)
        if data is None:
            self.send_error(404)
            return
        self.send_response(200)
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(len(data)),
                   **server.headers.get(path, {})}
        for name, value in headers.items():
            if value is not None:
                self.send_header(name, value)
        self.end_headers()
        if body:
            if server.delay:
                threading.Event().wait(server.delay)
            if path in server.drip:
                try:
                    for byte in data:
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                        threading.Event().wait(server.drip[path])
                except OSError:  # the client gave up
                    pass
                return
            self.wfile.write(data)

    def do_HEAD(self) -> None:  # noqa: N802 (the standard library's name)
        self._answer(body=False)

    def do_GET(self) -> None:  # noqa: N802
        self._answer(body=True)
