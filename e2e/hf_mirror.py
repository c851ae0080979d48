"""A TEST FIXTURE, not part of kubellm: a tiny Hugging Face–compatible mirror for the download tests.

It serves one model repository from a local directory over plain HTTP, speaking the subset of the
Hugging Face Hub API that `huggingface_hub.snapshot_download` (the product's `kubellm models
download hf://...`) uses, as read from huggingface_hub 2.4's code:

    GET  /api/models/{repo}[/revision/{rev}]        model info: id, sha (the commit), siblings
    GET  /api/models/{repo}/tree/{rev}[/{path}]     file listing (?recursive=true), type/path/size/oid[/lfs]
    HEAD /{repo}/resolve/{rev}/{path}               X-Repo-Commit, ETag, Content-Length (metadata)
    GET  /{repo}/resolve/{rev}/{path}               the bytes; `Range: bytes=a-[b]` answers 206

`rev` is `main` or the commit (a SHA-1 over the files' contents). Errors carry the Hub's
`X-Error-Code` (RepoNotFound, RevisionNotFound, EntryNotFound) so huggingface_hub raises its usual
exceptions. With a token, every request without `Authorization: Bearer <token>` is refused with 401,
as the Hub does for a private or gated repository. Standard library only, so it also runs where only
a Python interpreter is (a node, a pod).

    with HFMirror("/path/to/model", "org/tiny", token="secret") as mirror:
        env = {"HF_ENDPOINT": mirror.url, "HF_TOKEN": "secret"}     # then: kubellm models download hf://org/tiny

    python e2e/hf_mirror.py DIR REPO [--token T] [--host H] [--port P]   # serves until SIGTERM / Ctrl-C

`host` may be any local address (pods reach the mirror on the node's IP); `port=0` picks a free one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import signal
import socket
import sys
import threading
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".model")   # what the Hub stores in LFS
CHUNK = 1 << 20


class _Repo:
    """The files of `root` (hidden ones left out), their git/LFS ids and the commit over them."""

    def __init__(self, root: Path, repo_id: str):
        self.root, self.repo_id = root, repo_id
        self.files: dict[str, dict] = {}
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            rel = path.relative_to(root).as_posix()
            if any(part.startswith(".") for part in rel.split("/")):
                continue
            data = path.read_bytes()
            entry = {"type": "file", "path": rel, "size": len(data),
                     "oid": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()}   # git's blob id
            if rel.endswith(LFS_SUFFIXES):
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            self.files[rel] = entry
        self.sha = hashlib.sha1(json.dumps(sorted((e["path"], e["oid"]) for e in self.files.values())).encode()).hexdigest()
        self.modified = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")

    def etag(self, rel: str) -> str:
        entry = self.files[rel]
        return entry["lfs"]["oid"] if "lfs" in entry else entry["oid"]

    def info(self, private: bool) -> dict:
        return {"_id": self.sha[:24], "id": self.repo_id, "modelId": self.repo_id, "author": self.repo_id.split("/")[0],
                "sha": self.sha, "lastModified": self.modified, "private": private, "gated": False, "disabled": False,
                "tags": [], "library_name": "transformers",
                "siblings": [{"rfilename": rel} for rel in self.files]}

    def tree(self, path: str, recursive: bool) -> list[dict] | None:
        prefix = f"{path.strip('/')}/" if path.strip("/") else ""
        if prefix and not any(rel.startswith(prefix) for rel in self.files):
            return None
        out, folders = [], set()
        for rel, entry in self.files.items():
            if not rel.startswith(prefix):
                continue
            rest = rel[len(prefix):]
            parts = rest.split("/")
            for depth in range(1, len(parts)):   # the folders on the way
                folder = prefix + "/".join(parts[:depth])
                if (recursive or depth == 1) and folder not in folders:
                    folders.add(folder)
                    out.append({"type": "directory", "path": folder, "size": 0,
                                "oid": hashlib.sha1(folder.encode()).hexdigest()})
            if recursive or len(parts) == 1:
                out.append(entry)
        return out


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"   # keep-alive, as httpx expects; every reply has a Content-Length
    server: "_Server"

    def log_message(self, fmt, *args):   # quiet; the requests are recorded in HFMirror.requests
        pass

    # -- replies ----------------------------------------------------------------------------------
    def _reply(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, str(value))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body and not head:
            self.wfile.write(body)

    def _json(self, value, head: bool = False) -> None:
        self._reply(200, json.dumps(value).encode(), {"Content-Type": "application/json"}, head)

    def _error(self, status: int, code: str | None, message: str, head: bool = False) -> None:
        headers = {"Content-Type": "application/json", "X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._reply(status, json.dumps({"error": message}).encode(), headers, head)

    # -- requests ---------------------------------------------------------------------------------
    def do_GET(self):  # noqa: N802 (http.server naming)
        self._handle(head=False)

    def do_HEAD(self):  # noqa: N802
        self._handle(head=True)

    def _authorized(self, head: bool) -> bool:
        token = self.server.token
        given = self.headers.get("Authorization", "")
        ok = token is None or given == f"Bearer {token}"
        self.server.record(self.command, self.path, ok)
        if ok:
            return True
        if not given:   # what the Hub says about a private repository to an anonymous caller
            self._error(401, "RepoNotFound", "Invalid username or password.", head)
        else:
            self._error(401, None, "Invalid credentials in Authorization header", head)
        return False

    def _handle(self, head: bool) -> None:
        if not self._authorized(head):
            return
        url = urlsplit(self.path)
        path = unquote(url.path)
        repo = self.server.repo
        rid = repo.repo_id
        try:
            if path.startswith("/api/models/"):
                rest = path[len("/api/models/"):]
                if not (rest == rid or rest.startswith(rid + "/")):
                    asked = "/".join(rest.split("/")[:2])
                    return self._error(404, "RepoNotFound", f"Repository {asked!r} not found", head)
                rest = rest[len(rid):].strip("/")
                if rest == "":
                    return self._json(repo.info(self.server.token is not None), head)
                kind, _, rest = rest.partition("/")
                rev, _, sub = rest.partition("/")
                if rev not in ("main", repo.sha):
                    return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", head)
                if kind == "revision" and not sub:
                    return self._json(repo.info(self.server.token is not None), head)
                if kind == "tree":
                    recursive = parse_qs(url.query).get("recursive", ["false"])[0].lower() in ("true", "1")
                    listing = repo.tree(sub, recursive)
                    if listing is None:
                        return self._error(404, "EntryNotFound", f"{sub} does not exist on {rev}", head)
                    return self._json(listing, head)
                return self._error(404, None, f"{path}: not served by this mirror", head)
            if path.startswith(f"/{rid}/resolve/"):
                rev, _, rel = path[len(f"/{rid}/resolve/"):].partition("/")
                if rev not in ("main", repo.sha):
                    return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", head)
                if rel not in repo.files:
                    return self._error(404, "EntryNotFound", f"{rel} does not exist on {rev}", head)
                return self._file(rel, head)
            if path.startswith("/api/") or "/resolve/" in path:
                return self._error(404, "RepoNotFound", f"Repository not found for {path}", head)
            return self._error(404, None, f"{path}: not served by this mirror", head)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _file(self, rel: str, head: bool) -> None:
        repo = self.server.repo
        size = repo.files[rel]["size"]
        headers = {"X-Repo-Commit": repo.sha, "ETag": f'"{repo.etag(rel)}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        start, end, status = 0, size - 1, 200
        wanted = self.headers.get("Range")
        if wanted and not head:
            try:
                unit, _, spec = wanted.partition("=")
                first, _, last = spec.split(",")[0].strip().partition("-")
                if unit.strip() != "bytes" or not first:
                    raise ValueError(wanted)
                start, end = int(first), min(int(last) if last else size - 1, size - 1)
            except ValueError:
                return self._error(416, None, f"unsupported Range {wanted!r}")
            if start >= size or start > end:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        if head:
            self.send_response(200)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(size))
            self.end_headers()
            return
        try:
            f = open(repo.root / rel, "rb")
        except OSError as err:   # removed or unreadable since the mirror started
            return self._error(500, None, f"{rel}: {err.strerror}")
        with f:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(end - start + 1 if size else 0))
            self.end_headers()
            f.seek(start)
            left = end - start + 1
            while left > 0:
                chunk = f.read(min(CHUNK, left))
                if not chunk:
                    break
                self.wfile.write(chunk)
                left -= len(chunk)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, repo: _Repo, token: str | None):
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.repo, self.token = repo, token
        self.requests: list[tuple[str, str, bool]] = []
        self._lock = threading.Lock()
        super().__init__(address, _Handler)

    def record(self, method: str, path: str, authorized: bool) -> None:
        with self._lock:
            self.requests.append((method, path, authorized))


class HFMirror:
    """Serve `root_dir` as the model repository `repo_id` (see the module docstring). A test fixture."""

    def __init__(self, root_dir, repo_id: str, token: str | None = None, host: str = "127.0.0.1", port: int = 0):
        if repo_id.count("/") != 1 or not all(repo_id.split("/")):
            raise ValueError(f"repo_id: {repo_id!r} is not org/name")
        self.root = Path(root_dir)
        if not self.root.is_dir():
            raise ValueError(f"root_dir: {self.root} is not a directory")
        self.repo_id, self.token, self.host, self._port = repo_id, token, host, port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._server.server_address[1] if self._server else self._port

    @property
    def url(self) -> str:
        """The endpoint to give as HF_ENDPOINT (spec.model.endpoint)."""
        host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(self.host, self.host)
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}"

    @property
    def commit(self) -> str:
        return self._server.repo.sha

    @property
    def requests(self) -> list[tuple[str, str, bool]]:
        """(method, path, authorized) of every request so far."""
        with self._server._lock:
            return list(self._server.requests)

    def start(self) -> "HFMirror":
        self._server = _Server((self.host, self._port), _Repo(self.root, self.repo_id), self.token)
        self._thread = threading.Thread(target=self._server.serve_forever, name="hf-mirror", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(5)

    def __enter__(self) -> "HFMirror":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A test fixture: serve DIR as the Hugging Face repo REPO.")
    parser.add_argument("dir")
    parser.add_argument("repo", help="org/name")
    parser.add_argument("--token", default=None, help="refuse requests without 'Authorization: Bearer TOKEN'")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    mirror = HFMirror(args.dir, args.repo, token=args.token, host=args.host, port=args.port).start()
    print(f"hf-mirror (test fixture): {args.repo} from {args.dir} on {mirror.url} commit {mirror.commit}", flush=True)
    stopped = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopped.set())
    stopped.wait()
    mirror.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
