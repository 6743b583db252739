"""A stand-in for the Hugging Face hub's HTTP API on 127.0.0.1, for testing the hub loading path
offline with the real clients (`datasets`, `huggingface_hub`) pointed at it by HF_ENDPOINT.

It serves dataset repositories of files held in memory, through the endpoints those clients
call for a parquet dataset (found by logging what `datasets.load_dataset` asks for):

- GET  /api/datasets/{repo}[/revision/{rev}]      the repo's info: commit sha, files
- GET  /api/datasets/{repo}/tree/{rev}[/{path}]   a folder's listing (recursive on request)
- POST /api/datasets/{repo}/paths-info/{rev}      the entries of given paths
- HEAD/GET /datasets/{repo}/resolve/{rev}/{path}  a file, with byte ranges

Legacy names (`aliases`: `tiny-digits` -> `user/tiny-digits`) are answered as the hub answers
`mnist`: a redirect to the dataset they moved to. A private repo answers 401 without a token,
an unknown one 404, with the hub's error headers. Every request is logged in `requests`.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

SHA = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class Repo:
    files: dict[str, bytes]
    private: bool = False
    sha: str = SHA


@dataclass
class HubServer:
    """`with HubServer({"user/name": Repo({...})}) as hub: ...hub.url...`"""

    repos: dict[str, Repo]
    aliases: dict[str, str] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)
    url: str = ""

    def __enter__(self) -> HubServer:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # quiet: the requests are kept in `requests`
                return

            def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
                hub.handle(self, "HEAD")

            def do_GET(self) -> None:  # noqa: N802
                hub.handle(self, "GET")

            def do_POST(self) -> None:  # noqa: N802
                hub.handle(self, "POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    # --- routing ---------------------------------------------------------------------------------
    def handle(self, request: BaseHTTPRequestHandler, method: str) -> None:
        parts = urlsplit(request.path)
        path, query = unquote(parts.path), parse_qs(parts.query)
        self.requests.append(f"{method} {request.path}")
        body = b""
        if method == "POST":
            body = request.rfile.read(int(request.headers.get("Content-Length") or 0))
        for alias, target in self.aliases.items():
            for prefix in ("/api/datasets/", "/datasets/"):
                if path.startswith(f"{prefix}{alias}/") or path == f"{prefix}{alias}":
                    moved = request.path.replace(f"{prefix}{alias}", f"{prefix}{target}", 1)
                    return self.send_json(request, {"error": "moved"}, 307, {"Location": moved})
        api = re.fullmatch(r"/api/datasets/(.+?)(?:/(revision|tree|paths-info)/([^/]+)(/.*)?)?", path)
        resolve = re.fullmatch(r"/datasets/(.+?)/resolve/([^/]+)/(.+)", path)
        if api:
            repo_id, kind, _revision, sub = api.groups()
            repo = self.repo(request, repo_id)
            if repo is None:
                return
            if kind in (None, "revision"):
                return self.send_json(request, self.info(repo_id, repo))
            if kind == "tree":
                return self.send_json(request, self.tree(repo, (sub or "").strip("/"), "recursive" in query
                                                         and query["recursive"][0].lower() == "true"))
            return self.send_json(request, self.paths_info(repo, body, request.headers.get("Content-Type", "")))
        if resolve:
            repo_id, _revision, file_path = resolve.groups()
            repo = self.repo(request, repo_id)
            if repo is None:
                return
            if file_path not in repo.files:
                return self.send_error_json(request, 404, "EntryNotFound", f"{file_path} does not exist")
            return self.send_file(request, method, repo, file_path)
        self.send_error_json(request, 404, "RepoNotFound", f"no route for {path}")

    def repo(self, request: BaseHTTPRequestHandler, repo_id: str) -> Repo | None:
        repo = self.repos.get(repo_id)
        if repo is None:
            self.send_error_json(request, 404, "RepoNotFound", f"Repository not found: {repo_id}")
            return None
        if repo.private and not request.headers.get("Authorization"):
            self.send_error_json(request, 401, "RepoNotFound", "Invalid username or password.")
            return None
        return repo

    # --- answers ---------------------------------------------------------------------------------
    def info(self, repo_id: str, repo: Repo) -> dict:
        return {"_id": repo_id, "id": repo_id, "author": repo_id.split("/")[0] if "/" in repo_id else None,
                "sha": repo.sha, "private": repo.private, "gated": False, "disabled": False,
                "lastModified": "2024-01-01T00:00:00.000Z", "tags": [], "downloads": 0, "likes": 0,
                "cardData": {}, "siblings": [{"rfilename": name} for name in sorted(repo.files)]}

    @staticmethod
    def entry(repo: Repo, path: str) -> dict:
        if path in repo.files:
            data = repo.files[path]
            return {"type": "file", "path": path, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}  # noqa: S324 - git's blob id
        return {"type": "directory", "path": path, "size": 0, "oid": hashlib.sha1(path.encode()).hexdigest()}  # noqa: S324

    def tree(self, repo: Repo, folder: str, recursive: bool) -> list[dict]:
        prefix = f"{folder}/" if folder else ""
        paths: set[str] = set()
        for name in repo.files:
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix):].split("/")
            depth = len(rest) if recursive else 1
            for i in range(1, depth + 1):
                paths.add(prefix + "/".join(rest[:i]))
        return [self.entry(repo, p) for p in sorted(paths)]

    def paths_info(self, repo: Repo, body: bytes, content_type: str) -> list[dict]:
        if "json" in content_type:
            wanted = json.loads(body or b"{}").get("paths", [])
        else:
            wanted = parse_qs(body.decode()).get("paths", [])
        folders = {"/".join(name.split("/")[:i]) for name in repo.files for i in range(1, name.count("/") + 1)}
        return [self.entry(repo, p) for p in wanted if p in repo.files or p in folders]

    # --- HTTP ------------------------------------------------------------------------------------
    @staticmethod
    def send_json(request: BaseHTTPRequestHandler, value: object, status: int = 200,
                  headers: dict[str, str] | None = None) -> None:
        data = json.dumps(value).encode()
        request.send_response(status)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(data)))
        for key, header in (headers or {}).items():
            request.send_header(key, header)
        request.end_headers()
        request.wfile.write(data)

    def send_error_json(self, request: BaseHTTPRequestHandler, status: int, code: str, message: str) -> None:
        self.send_json(request, {"error": message}, status, {"X-Error-Code": code, "X-Error-Message": message})

    @staticmethod
    def send_file(request: BaseHTTPRequestHandler, method: str, repo: Repo, path: str) -> None:
        data = repo.files[path]
        status, start, end = 200, 0, len(data) - 1
        ranged = re.fullmatch(r"bytes=(\d*)-(\d*)", request.headers.get("Range", ""))
        if ranged and data:
            first, last = ranged.groups()
            if first:
                start, end = int(first), min(int(last), len(data) - 1) if last else len(data) - 1
            else:  # a suffix: the last N bytes
                start = max(0, len(data) - int(last))
            status = 206
        chunk = data[start:end + 1]
        request.send_response(status)
        request.send_header("Content-Length", str(len(chunk)))
        request.send_header("Accept-Ranges", "bytes")
        request.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        request.send_header("X-Repo-Commit", repo.sha)
        request.send_header("Content-Type", "application/octet-stream")
        if status == 206:
            request.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        request.end_headers()
        if method == "GET":
            request.wfile.write(chunk)
