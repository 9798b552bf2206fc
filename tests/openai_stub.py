"""A stand-in for an OpenAI-compatible endpoint on loopback: chat completions, streamed as the real ones
are, with the reply chosen by a function of the request's last message; it can also fail on purpose."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class StubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def log_message(self, *args):
        pass

    def _json(self, status: int, body: dict) -> None:
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def do_GET(self):
        if self.server.mode == "unauthorized":
            return self._json(401, {"error": {"message": "invalid api key"}})
        if self.path != "/v1/models":
            return self._json(404, {"error": {"message": "not found"}})
        self._json(200, {"object": "list", "data": [{"id": self.server.model_name, "object": "model"}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server = self.server
        with server.lock:
            server.requests.append(body)
        time.sleep(server.delay)
        if server.mode == "error":
            return self._json(500, {"error": {"message": "the stub is down"}})
        if server.mode == "unauthorized":
            return self._json(401, {"error": {"message": "invalid api key"}})
        if server.mode == "not_json":
            payload = b"<html><body>502 Bad Gateway</body></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            return self.wfile.write(payload)
        answer = server.reply(body["messages"][-1]["content"])
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        if server.mode == "cut":  # half the answer, then the connection closes without [DONE]
            answer = answer[:len(answer) // 2]
        for start in range(0, len(answer), 7):
            chunk = {"choices": [{"index": 0, "delta": {"content": answer[start:start + 7]}}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
        if server.mode == "cut":
            return
        usage = {"choices": [], "usage": {"completion_tokens": 7, "prompt_tokens": 20, "total_tokens": 27}}
        self.wfile.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())


class StubEndpoint:
    """`with StubEndpoint(reply) as stub:` serves on loopback; `stub.url` is the /v1 base address,
    `stub.server.requests` every request body received; set `stub.server.mode` to "error" (HTTP 500),
    "unauthorized" (HTTP 401), "not_json" (an HTML page) or "cut" (half an answer, then the connection
    closes), and `stub.server.delay` to slow each answer down."""

    def __init__(self, reply, model_name: str = "stub-writer"):
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), StubHandler)
        self.server.reply, self.server.model_name = reply, model_name
        self.server.requests, self.server.lock = [], threading.Lock()
        self.server.mode, self.server.delay = "ok", 0.0
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
