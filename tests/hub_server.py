"""A local stand-in for the Hugging Face Hub: the part of its HTTP API that huggingface_hub's HfApi uses to create a
repository, branch and collection item, commit (preupload, LFS batch + PUT, NDJSON commit), list commits (paginated
with a Link header), and that snapshot_download / hf_hub_download read (revision info, recursive tree, resolve).

    with HubServer(tmp_path) as hub:        # 127.0.0.1, port 0, in a thread
        env = {"HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": "hf_test"}

Failure injection for tests: `fail(count, status, match)` answers the next `count` requests whose "METHOD /path"
contains `match` with `status`; `hang(match, after)` lets `after` matching requests through, then holds the next ones
(none is applied) until `release()`, setting `hung` when one arrives. `requests` records "METHOD /path" of every
request. LFS objects are kept as files under the given directory (a checkpoint's DeepSpeed state is hundreds of MiB
even for a tiny model).
"""

import base64
import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

AUTHOR = "megapico-test"
LFS_SUFFIXES = (".safetensors", ".pt", ".bin", ".arrow", ".pth", ".npy")


def git_oid(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass(frozen=True)
class Blob:
    size: int
    oid: str  # git blob sha1 (of the pointer file for LFS)
    sha256: str | None = None  # LFS files only
    content: bytes | None = None  # regular files only
    pointer_size: int = 0


def lfs_blob(sha256: str, size: int) -> Blob:
    pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()
    return Blob(size, git_oid(pointer), sha256, None, len(pointer))


@dataclass
class Commit:
    id: str
    parent: str | None
    title: str
    message: str
    date: str
    files: dict[str, Blob]


@dataclass
class Repo:
    private: bool = False  # what create_repo asked for ("private", or client 2.x's "visibility"; default public)
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, body: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.body = status, code, body


class HubServer:
    def __init__(self, storage: Path, page_size: int = 4):
        self.storage = Path(storage)
        self.storage.mkdir(parents=True, exist_ok=True)
        self.page_size = page_size  # commits per listing page: small, so that pagination is exercised
        self.repos: dict[str, Repo] = {}
        self.collections: dict[str, list[dict]] = {}
        self.lfs: dict[str, int] = {}  # sha256 -> size, content in storage/sha256
        self.requests: list[str] = []
        self.lock = threading.Lock()
        self._failures: list[list] = []  # [count, status, match]
        self._hang_match: str | None = None
        self._hang_after = 0
        self.hung = threading.Event()
        self._release = threading.Event()
        self._counter = 0
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.release()
        self.httpd.shutdown()
        self.httpd.server_close()

    # failure injection
    def fail(self, count: int, status: int = 500, match: str = "") -> None:
        with self.lock:
            self._failures.append([count, status, match])

    def hang(self, match: str = "", after: int = 0) -> None:
        self.hung.clear()
        self._release.clear()
        self._hang_match, self._hang_after = match, after

    def release(self) -> None:
        self._hang_match = None
        self._release.set()

    def heal(self) -> None:
        with self.lock:
            self._failures.clear()
        self.release()

    def _injected(self, line: str) -> int | None:
        """A status to answer `line` with instead of serving it (blocking first if it is to hang)."""
        if self._hang_match is not None and self._hang_match in line:
            with self.lock:
                self._hang_after -= 1
                holding = self._hang_after < 0
            if holding:
                self.hung.set()
                self._release.wait()
                return 503
        with self.lock:
            for failure in self._failures:
                if failure[0] > 0 and failure[2] in line:
                    failure[0] -= 1
                    return failure[1]
        return None

    # state
    def _new_commit(self, repo: Repo, parent: str | None, title: str, message: str, files: dict[str, Blob]) -> str:
        self._counter += 1
        commit_id = hashlib.sha1(f"{parent}:{title}:{self._counter}".encode()).hexdigest()
        now = time.time()
        date = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d}Z"
        repo.commits[commit_id] = Commit(commit_id, parent, title, message, date, files)
        return commit_id

    def _repo(self, repo_id: str) -> Repo:
        if repo_id not in self.repos:
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return self.repos[repo_id]

    def _resolve(self, repo: Repo, revision: str) -> Commit:
        revision = unquote(revision)
        commit_id = repo.branches.get(revision, revision)
        if commit_id not in repo.commits:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return repo.commits[commit_id]

    def history(self, repo_id: str, revision: str) -> list[Commit]:
        """Commits reachable from `revision`, newest first."""
        repo = self.repos[repo_id]
        commit, out = self._resolve(repo, revision), []
        while commit is not None:
            out.append(commit)
            commit = repo.commits.get(commit.parent) if commit.parent else None
        return out

    def lfs_path(self, sha256: str) -> Path:
        return self.storage / sha256

    def read(self, blob: Blob) -> bytes:
        return blob.content if blob.content is not None else self.lfs_path(blob.sha256).read_bytes()

    # routes
    def create_repo(self, body: dict) -> dict:
        repo_id = f"{body.get('organization') or AUTHOR}/{body['name']}"
        if repo_id in self.repos:
            raise HubError(409, "You already created this model repo", body={"url": f"{self.url}/{repo_id}"})
        repo = self.repos[repo_id] = Repo(private=bool(body.get("private")) or body.get("visibility") == "private")
        attributes = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.pt filter=lfs diff=lfs merge=lfs -text\n"
        files = {".gitattributes": Blob(len(attributes), git_oid(attributes), content=attributes)}
        repo.branches["main"] = self._new_commit(repo, None, "initial commit", "", files)
        return {"url": f"{self.url}/{repo_id}", "name": repo_id, "id": repo_id}

    def create_branch(self, repo_id: str, branch: str, body: dict) -> dict:
        repo = self._repo(repo_id)
        branch = unquote(branch)
        if branch in repo.branches:
            raise HubError(409, f"Reference refs/heads/{branch} already exists")
        repo.branches[branch] = self._resolve(repo, body.get("startingPoint") or "main").id
        return {}

    def refs(self, repo_id: str) -> dict:
        repo = self._repo(repo_id)
        return {"branches": [{"name": name, "ref": f"refs/heads/{name}", "targetCommit": commit}
                             for name, commit in repo.branches.items()],
                "converts": [], "tags": [], "pullRequests": []}

    def collection(self, slug: str) -> dict:
        items = self.collections.setdefault(slug, [])
        return {"slug": slug, "title": slug.split("/")[-1], "owner": {"name": slug.split("/")[0]}, "items": items,
                "lastUpdated": "2026-01-01T00:00:00.000Z", "position": 0, "private": False, "theme": "default",
                "upvotes": 0}

    def add_collection_item(self, slug: str, body: dict) -> dict:
        items = self.collections.setdefault(slug, [])
        item = body["item"]
        if any(existing["id"] == item["id"] for existing in items):
            raise HubError(409, "Item already in the collection")
        items.append({"_id": f"item{len(items)}", "id": item["id"], "type": item["type"], "position": len(items)})
        return self.collection(slug)

    def preupload(self, repo_id: str, revision: str, body: dict) -> dict:
        files = self._resolve(self._repo(repo_id), revision).files
        out = []
        for entry in body["files"]:
            sample = base64.b64decode(entry["sample"])
            lfs = entry["size"] > 1_000_000 or entry["path"].endswith(LFS_SUFFIXES) or b"\0" in sample
            remote = files.get(entry["path"])
            oid = None if remote is None else remote.sha256 if remote.sha256 else remote.oid
            out.append({"path": entry["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                        "oid": oid})
        return {"files": out, "commitOid": self._resolve(self._repo(repo_id), revision).id}

    def lfs_batch(self, repo_id: str, body: dict) -> dict:
        self._repo(repo_id)
        objects = []
        for obj in body["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.lfs:
                entry["actions"] = {"upload": {"href": f"{self.url}/lfs-upload/{obj['oid']}", "header": {}}}
            objects.append(entry)
        return {"transfer": "basic", "objects": objects}

    def lfs_put(self, oid: str, content: bytes) -> dict:
        if hashlib.sha256(content).hexdigest() != oid:
            raise HubError(400, "sha256 of the uploaded content differs from the oid")
        self.lfs_path(oid).write_bytes(content)
        self.lfs[oid] = len(content)
        return {}

    def commit(self, repo_id: str, revision: str, lines: list[dict]) -> dict:
        repo = self._repo(repo_id)
        branch = unquote(revision)
        if branch not in repo.branches:
            raise HubError(404 if len(branch) != 40 else 400, f"Invalid rev id: {branch}", "RevisionNotFound")
        head = repo.commits[repo.branches[branch]]
        header = lines[0]["value"]
        if header.get("parentCommit") and header["parentCommit"] != head.id:
            raise HubError(412, f"A commit has happened since {header['parentCommit']}: the branch is at {head.id}")
        files = dict(head.files)
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            path = value["path"]
            if key == "file":
                content = base64.b64decode(value["content"])
                files[path] = Blob(len(content), git_oid(content), content=content)
            elif key == "lfsFile":
                if value["oid"] not in self.lfs:
                    raise HubError(422, f"{path}: LFS object {value['oid']} was never uploaded")
                files[path] = lfs_blob(value["oid"], self.lfs[value["oid"]])
            elif key == "deletedFile":
                if path not in files:
                    raise HubError(404, f"{path}: no such file to delete", "EntryNotFound")
                del files[path]
            elif key == "deletedFolder":
                prefix = path.rstrip("/") + "/"
                for name in [name for name in files if name.startswith(prefix)]:
                    del files[name]
            else:
                raise HubError(400, f"unknown commit operation {key}")
        commit_id = self._new_commit(repo, head.id, header["summary"], header.get("description", ""), files)
        repo.branches[branch] = commit_id
        return {"success": True, "commitOid": commit_id, "commitUrl": f"{self.url}/{repo_id}/commit/{commit_id}",
                "pullRequestUrl": None}

    def commits(self, repo_id: str, revision: str, page: int) -> tuple[list[dict], str | None]:
        self._resolve(self._repo(repo_id), revision)
        history = self.history(repo_id, revision)
        chunk = history[page * self.page_size:(page + 1) * self.page_size]
        items = [{"id": c.id, "title": c.title, "message": c.message, "date": c.date, "authors": [{"user": AUTHOR}]}
                 for c in chunk]
        more = (page + 1) * self.page_size < len(history)
        return items, f"{self.url}/api/models/{repo_id}/commits/{quote(unquote(revision), safe='')}?p={page + 1}" \
            if more else None

    def revision(self, repo_id: str, revision: str) -> dict:
        commit = self._resolve(self._repo(repo_id), revision)
        return {"id": repo_id, "modelId": repo_id, "sha": commit.id, "private": self._repo(repo_id).private,
                "author": repo_id.split("/")[0],
                "siblings": [{"rfilename": name} for name in sorted(commit.files)], "tags": [],
                "lastModified": commit.date}

    def tree(self, repo_id: str, revision: str, path: str, recursive: bool) -> list[dict]:
        commit = self._resolve(self._repo(repo_id), revision)
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        if prefix and not any(name.startswith(prefix) for name in commit.files):
            raise HubError(404, f"{path}: no such path", "EntryNotFound")
        entries, folders = [], set()
        for name in sorted(commit.files):
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix):].split("/")
            for depth in range(1, len(rest)):
                folder = prefix + "/".join(rest[:depth])
                if (recursive or depth == 1) and folder not in folders:
                    folders.add(folder)
                    entries.append({"type": "directory", "oid": git_oid(folder.encode()), "size": 0, "path": folder})
            if recursive or len(rest) == 1:
                blob = commit.files[name]
                entry = {"type": "file", "oid": blob.oid, "size": blob.size, "path": name}
                if blob.sha256:
                    entry["lfs"] = {"oid": blob.sha256, "size": blob.size, "pointerSize": blob.pointer_size}
                entries.append(entry)
        return entries

    def resolve(self, repo_id: str, revision: str, path: str) -> tuple[Commit, Blob]:
        commit = self._resolve(self._repo(repo_id), revision)
        if path not in commit.files:
            raise HubError(404, f"{path}: entry not found", "EntryNotFound")
        return commit, commit.files[path]


def _handler(hub: HubServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().strip().split(b";")[0], 16)
                    if size == 0:
                        self.rfile.readline()
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _send(self, status: int, payload=None, headers: dict | None = None, raw: bytes | None = None,  # noqa: ANN001
                  head: bool = False):
            body = raw if raw is not None else json.dumps(payload if payload is not None else {}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream" if raw is not None else "application/json")
            self.send_header("Content-Length", str(len(body)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _serve(self, method: str):
            url = urlsplit(self.path)
            line = f"{method} {url.path}"
            body = self._body() if method in ("POST", "PUT") else b""
            hub.requests.append(line)
            status = hub._injected(line)
            if status is not None:
                self._send(status, {"error": f"injected failure {status}"})
                return
            try:
                with hub.lock:
                    self._route(method, url.path, parse_qs(url.query), body)
            except HubError as err:
                headers = {"X-Error-Message": str(err)}
                if err.code:
                    headers["X-Error-Code"] = err.code
                self._send(err.status, {"error": str(err), **(err.body or {})}, headers, head=method == "HEAD")
            except (BrokenPipeError, ConnectionResetError):
                pass

        def _route(self, method: str, path: str, query: dict, body: bytes):
            parts = [unquote(part) for part in path.strip("/").split("/")]
            head = method == "HEAD"
            if parts[:2] == ["api", "repos"] and parts[2:] == ["create"]:
                return self._send(200, hub.create_repo(json.loads(body)))
            if parts[:2] == ["api", "validate-yaml"]:
                return self._send(200, {})
            if parts[:2] == ["api", "collections"] and len(parts) >= 4:
                slug = "/".join(parts[2:4])
                if parts[4:] == ["items"] and method == "POST":
                    return self._send(200, hub.add_collection_item(slug, json.loads(body)))
                return self._send(200, hub.collection(slug))
            if parts[:2] == ["api", "models"] and len(parts) >= 4:
                repo_id, action, rest = "/".join(parts[2:4]), (parts[4:5] or [""])[0], parts[5:]
                revision = rest[0] if rest else "main"
                if action == "branch":
                    return self._send(200, hub.create_branch(repo_id, "/".join(rest), json.loads(body or b"{}")))
                if action == "refs":
                    return self._send(200, hub.refs(repo_id))
                if action == "preupload":
                    return self._send(200, hub.preupload(repo_id, revision, json.loads(body)))
                if action == "commit":
                    lines = [json.loads(item) for item in body.decode().splitlines() if item.strip()]
                    return self._send(200, hub.commit(repo_id, revision, lines))
                if action == "commits":
                    items, following = hub.commits(repo_id, revision, int(query.get("p", ["0"])[0]))
                    return self._send(200, items, {"Link": f'<{following}>; rel="next"'} if following else None)
                if action in ("revision", ""):
                    return self._send(200, hub.revision(repo_id, revision))
                if action == "tree":
                    recursive = query.get("recursive", ["false"])[0].lower() == "true"
                    return self._send(200, hub.tree(repo_id, revision, "/".join(rest[1:]), recursive))
            if parts[0] == "lfs-upload" and method == "PUT":
                return self._send(200, hub.lfs_put(parts[1], body))
            if len(parts) >= 6 and parts[1].endswith(".git") and parts[2:] == ["info", "lfs", "objects", "batch"]:
                return self._send(200, hub.lfs_batch(f"{parts[0]}/{parts[1][:-4]}", json.loads(body)))
            if len(parts) >= 5 and parts[2] == "resolve":
                commit, blob = hub.resolve("/".join(parts[:2]), parts[3], "/".join(parts[4:]))
                headers = {"X-Repo-Commit": commit.id, "ETag": f'"{blob.sha256 or blob.oid}"'}
                if blob.sha256:
                    headers.update({"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(blob.size)})
                content = b"" if head else hub.read(blob)
                start = self.headers.get("Range", "").removeprefix("bytes=").split("-")[0]
                if start.isdigit() and not head:
                    content = content[int(start):]
                    headers["Content-Range"] = f"bytes {start}-{blob.size - 1}/{blob.size}"
                if head:
                    self.send_response(200)
                    for key, value in {**headers, "Content-Length": str(blob.size)}.items():
                        self.send_header(key, value)
                    self.end_headers()
                    return None
                return self._send(206 if "Content-Range" in headers else 200, None, headers, raw=content)
            raise HubError(404, f"no route for {method} {path}")

        def do_GET(self):
            self._serve("GET")

        def do_HEAD(self):
            self._serve("HEAD")

        def do_POST(self):
            self._serve("POST")

        def do_PUT(self):
            self._serve("PUT")

    return Handler
