"""A local HTTP server that speaks enough of the Hugging Face Hub protocol for huggingface_hub.

It serves in-memory files on 127.0.0.1 so download tests never touch the internet:
  HEAD/GET /{owner}/{name}/resolve/{revision}/{path}   (X-Repo-Commit, ETag / X-Linked-Etag, X-Linked-Size,
                                                        Range requests)
  GET      /api/models/{owner}/{name}/revision/{revision}
  POST     /api/models/{owner}/{name}/paths-info/{revision}
  GET      /api/models/{owner}/{name}/tree/{revision}[/{path}]
Every request is logged (method, path, headers) so tests can assert what was asked for. Faults can be injected:
a transfer cut after N bytes, a transfer that stalls after N bytes (so a client can be killed mid-file), a wrong
advertised hash or size, a required token.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class HubFile:
    data: bytes
    lfs: bool
    sha256: str  # what the server claims (may be wrong on purpose)
    size: int  # what the server claims in metadata (may be wrong on purpose)
    oid: str = ""  # git blob id reported by the Hub (computed when added)
    head_size: int | None = None  # override for X-Linked-Size only


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names


@dataclass
class FakeHub:
    repos: dict[str, dict[str, HubFile]] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    require_token: str | None = None
    cuts: dict[tuple[str, str], int] = field(default_factory=dict)  # (repo, path) -> bytes before a drop
    stalls: dict[tuple[str, str], int] = field(default_factory=dict)  # (repo, path) -> bytes before a stall
    url: str = ""
    released: threading.Event = field(default_factory=threading.Event)  # ends every stall

    def add(self, repo: str, path: str, data: bytes, *, lfs: bool | None = None, sha256: str | None = None,
            size: int | None = None, head_size: int | None = None) -> HubFile:
        lfs = len(data) > 100 if lfs is None else lfs
        oid = hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()
        f = HubFile(data, lfs, sha256 or hashlib.sha256(data).hexdigest(), len(data) if size is None else size,
                    oid, head_size)
        self.repos.setdefault(repo, {})[path] = f
        return f

    def cut_next_transfer(self, repo: str, path: str, after: int) -> None:
        self.cuts[(repo, path)] = after

    def stall_next_transfer(self, repo: str, path: str, after: int) -> None:
        """The next GET of the file sends `after` bytes, then nothing more until the server stops: a transfer
        that hangs, for tests that kill the client in the middle of a file."""
        self.stalls[(repo, path)] = after

    def requested(self, method: str | None = None, contains: str = "") -> list[Request]:
        return [r for r in self.requests if (method is None or r.method == method) and contains in r.path]

    # -- lifecycle ------------------------------------------------------------------------------------
    def __enter__(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            fake = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.released.set()
        self._server.shutdown()
        self._server.server_close()


def _entry(path: str, f: HubFile) -> dict:
    info = {"type": "file", "path": path, "size": f.size, "oid": f.oid}
    if f.lfs:
        info["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": 134}
    return info


class _Handler(BaseHTTPRequestHandler):
    fake: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:  # keep test output clean
        pass

    # -- helpers --------------------------------------------------------------------------------------
    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, payload: object, headers: dict[str, str] | None = None) -> None:
        self._send(200, json.dumps(payload).encode(), headers)

    def _error(self, status: int, code: str, message: str) -> None:
        self._send(status, json.dumps({"error": message}).encode(),
                   {"X-Error-Code": code, "X-Error-Message": message, "X-Repo-Commit": COMMIT})

    def _authorised(self) -> bool:
        want = self.fake.require_token
        if want is None or self.headers.get("Authorization") == f"Bearer {want}":
            return True
        self._error(401, "RepoNotFound", "Invalid username or password.")
        return False

    def _repo(self, owner: str, name: str) -> dict[str, HubFile] | None:
        files = self.fake.repos.get(f"{owner}/{name}")
        if files is None:
            self._error(404, "RepoNotFound", "Repository not found")
        return files

    def _revision_ok(self, revision: str) -> bool:
        if unquote(revision) in ("main", COMMIT):
            return True
        self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return False

    # -- routes ---------------------------------------------------------------------------------------
    def _route(self) -> None:
        url = urlsplit(self.path)
        self.fake.requests.append(Request(self.command, url.path, {k.lower(): v for k, v in self.headers.items()}))
        # Read the body before any answer, or an early error reply leaves it on the kept-alive connection.
        self.body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if not self._authorised():
            return
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        if len(parts) >= 5 and parts[2] == "resolve":
            return self._resolve(parts[0], parts[1], parts[3], "/".join(parts[4:]))
        if len(parts) >= 6 and parts[:2] == ["api", "models"]:
            owner, name, action, revision, rest = parts[2], parts[3], parts[4], parts[5], parts[6:]
            files = self._repo(owner, name)
            if files is None or not self._revision_ok(revision):
                return None
            if action == "revision" and self.command == "GET":
                return self._json({"id": f"{owner}/{name}", "sha": COMMIT,
                                   "siblings": [{"rfilename": p} for p in files]})
            if action == "paths-info" and self.command == "POST":
                form = parse_qs(self.body.decode())
                return self._json([_entry(p, files[p]) for p in form.get("paths", []) if p in files])
            if action == "tree" and self.command == "GET":
                prefix = "/".join(rest)
                return self._json([_entry(p, f) for p, f in sorted(files.items())
                                   if not prefix or p.startswith(prefix + "/")])
        return self._error(404, "NotFound", f"no route for {self.command} {url.path}")

    def _resolve(self, owner: str, name: str, revision: str, path: str) -> None:
        files = self._repo(owner, name)
        if files is None or not self._revision_ok(revision):
            return
        f = files.get(path)
        if f is None:
            return self._error(404, "EntryNotFound", f"{path} does not exist")
        headers = {"X-Repo-Commit": COMMIT, "Accept-Ranges": "bytes", "ETag": f'"{f.oid}"'}
        if f.lfs:
            headers["X-Linked-Etag"] = f'"{f.sha256}"'
            headers["X-Linked-Size"] = str(f.head_size if f.head_size is not None else f.size)
        data, status = f.data, 200
        rng = self.headers.get("Range")
        if self.command == "GET" and rng and rng.startswith("bytes="):
            start = int(rng[len("bytes="):].split("-")[0])
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            data, status = data[start:], 206
        key = (f"{owner}/{name}", path)
        cut = self.fake.cuts.pop(key, None) if self.command == "GET" else None
        stall = self.fake.stalls.pop(key, None) if self.command == "GET" else None
        if cut is None and stall is None:
            return self._send(status, data, headers, "application/octet-stream")
        # Promise the whole body, deliver part of it, then drop the connection (a network failure mid-transfer)
        # or hang until the server stops (a stalled transfer, for killing the client while it waits).
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data[:cut if cut is not None else stall])
        self.wfile.flush()
        if stall is not None:
            self.fake.released.wait()
        self.close_connection = True

    do_GET = do_HEAD = do_POST = _route


# ---------------------------------------------------------------------------------------------------------
# pytest glue: import `fake_hub` into a test module to use it as a fixture.

# Files a Hugging Face model folder has; the *.bin and README must never be fetched (not in allow_patterns).
MODEL_FOLDER = {
    "config.json": b'{"model_type": "fake"}',
    "tokenizer_config.json": b'{"padding_side": "right"}',
    "tokenizer.model": b"T" * 300,
    "model.safetensors": b"S" * 2000,
    "pytorch_model.bin": b"B" * 2000,
    "README.md": b"# fake",
}
DECOY = "checkpoints/PixelDiT_finetune_2kto4k/model_ema_bf16.pth"


def fake_bytes(path: str, size: int = 4096) -> bytes:
    """Deterministic content per path, so every file has its own hash."""
    seed = hashlib.sha256(path.encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


def populate(hub: FakeHub, entries: Iterable) -> None:
    """Serve a small stand-in for every file the given registry entries reference (plus decoys)."""
    for entry in entries:
        refs = [entry.weights] + (list(entry.vae.files.values()) if entry.vae else [])
        for ref in refs:
            if ref.repo is not None:
                hub.add(ref.repo, ref.path, fake_bytes(ref.path))
        repos = (list(entry.vae.repos.values()) if entry.vae else []) + [entry.text_encoder]
        for ref in repos:
            if ref is not None and ref.repo is not None:
                for name, data in MODEL_FOLDER.items():
                    hub.add(ref.repo, name, data)
    hub.add("nvidia/PiD", DECOY, fake_bytes(DECOY, 8192))
    hub.add("nvidia/PiD", "README.md", b"# PiD")


@pytest.fixture
def fake_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """A running FakeHub with HF_ENDPOINT pointing at it and every cache inside tmp_path."""
    from huggingface_hub import constants

    with FakeHub() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
        monkeypatch.setenv("PID_CACHE_DIR", str(tmp_path / "pid"))
        monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        monkeypatch.setenv("COLUMNS", "250")
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HF_HOME", "PID_REGISTRY"):
            monkeypatch.delenv(var, raising=False)
        # huggingface_hub reads these at import time; make sure a developer's login never leaks into a test.
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
        monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-stored-tokens"))
        yield hub
