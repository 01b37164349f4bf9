"""A small in-memory Hugging Face Hub for tests (stdlib only).

Serves the endpoints that `huggingface_hub` 1.x/2.x calls for `create_repo`, `create_commit` /
`upload_folder` / `push_to_hub` (preupload, git-LFS batch + basic transfer, NDJSON commit,
README metadata validation) and for `snapshot_download` / `hf_hub_download` (repo info, tree
listing, `resolve` with `HEAD`, `ETag`, `X-Repo-Commit` and byte ranges). Files named like
weights (or of 10 MiB and more) are uploaded through LFS, the rest inline, as on the real Hub.

    with HubServer() as hub:  # then set HF_ENDPOINT=hub.url, HF_TOKEN=hub.token, HF_HUB_DISABLE_XET=1
        ...
"""

import base64
import hashlib
import json
import re
import socket
import threading
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml


LFS_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".h5",
    ".onnx",
    ".msgpack",
    ".npy",
    ".npz",
    ".pkl",
    ".tar",
    ".tar.gz",
    ".zip",
    ".png",
    ".jpg",
    ".jpeg",
    ".parquet",
    ".arrow",
)
LFS_MIN_SIZE = 10 * 1024 * 1024
GITATTRIBUTES = "".join(f"*{suffix} filter=lfs diff=lfs merge=lfs -text\n" for suffix in LFS_SUFFIXES).encode()
# Hub pipeline tags that a model card may use (subset of the Hub's task list).
PIPELINE_TAGS = {
    "image-classification",
    "image-feature-extraction",
    "image-segmentation",
    "object-detection",
    "depth-estimation",
    "mask-generation",
    "zero-shot-image-classification",
    "image-to-image",
    "image-to-text",
    "feature-extraction",
    "text-classification",
    "fill-mask",
    "text-generation",
}
REPO_PATH = r"(?P<prefix>datasets/|spaces/)?(?P<repo>[\w.-]+/[\w.-]+?)"
API_REPO = r"/api/(?P<type>model|dataset|space)s/(?P<repo>[\w.-]+/[\w.-]+)"


def git_blob_sha1(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class HubError(Exception):
    """An HTTP error answered the way the Hub does (`X-Error-Code` drives huggingface_hub's exceptions)."""

    def __init__(self, status, message, code=None, commit=None, body=None):
        super().__init__(message)
        self.status, self.message, self.code, self.commit, self.body = status, message, code, commit, body


class StoredFile:
    def __init__(self, content: bytes, lfs: bool):
        self.content, self.lfs = content, lfs
        self.sha256 = hashlib.sha256(content).hexdigest()
        pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {len(content)}\n"
        self.pointer_size = len(pointer)
        self.blob_id = git_blob_sha1(pointer.encode() if lfs else content)
        self.etag = self.sha256 if lfs else self.blob_id  # the Hub's ETag; also the preupload "oid"

    def tree_entry(self, path):
        entry = {"type": "file", "path": path, "size": len(self.content), "oid": self.blob_id}
        if self.lfs:
            entry["lfs"] = {"oid": self.sha256, "size": len(self.content), "pointerSize": self.pointer_size}
        return entry


class Repo:
    def __init__(self, repo_type, repo_id, private):
        self.repo_type, self.repo_id, self.private = repo_type, repo_id, private
        self.commits = {}  # sha -> {path: StoredFile}
        self.branches = {}  # name -> sha
        self.last_modified = utc_now()

    def resolve(self, revision):
        sha = self.branches.get(revision, revision if revision in self.commits else None)
        if sha is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return sha, self.commits[sha]

    def commit(self, branch, files, summary):
        parent = self.branches.get(branch)
        listing = sorted((path, stored.etag) for path, stored in files.items())
        sha = hashlib.sha1(json.dumps([parent, summary, listing]).encode()).hexdigest()
        self.commits[sha], self.branches[branch] = files, sha
        self.last_modified = utc_now()
        return sha


class FakeHub:
    """Repos, LFS objects and the logic of each endpoint; thread-safe."""

    def __init__(self, token="hf_test", user="test-user"):
        self.token, self.user = token, user
        self.repos, self.lfs_objects = {}, {}  # (type, repo_id) -> Repo ; sha256 -> bytes
        self.requests = []  # (method, path) of every request, for assertions
        self.url = None  # set by HubServer
        self.lock = threading.RLock()

    def repo(self, repo_type, repo_id, token, write=False):
        repo = self.repos.get((repo_type, repo_id))
        if write and token != self.token:
            raise HubError(401, "Invalid credentials in Authorization header")
        if repo is None or (repo.private and token != self.token):
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    def create_repo(self, body, token):
        if token != self.token:
            raise HubError(401, "Invalid credentials in Authorization header")
        repo_type = body.get("type") or "model"
        repo_id = f"{body.get('organization') or self.user}/{body['name']}"
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        url = {"url": f"{self.url}/{prefix}{repo_id}", "name": repo_id}
        if (repo_type, repo_id) in self.repos:
            raise HubError(409, "You already created this model repo", body=url)  # exist_ok reads the url
        repo = self.repos[(repo_type, repo_id)] = Repo(repo_type, repo_id, body.get("visibility") == "private")
        repo.commit("main", {".gitattributes": StoredFile(GITATTRIBUTES, lfs=False)}, "initial commit")
        return url

    def info(self, repo, revision):
        sha, files = repo.resolve(revision)
        siblings = [
            {
                "rfilename": path,
                "size": len(f.content),
                "blobId": f.blob_id,
                "lfs": {"sha256": f.sha256, "size": len(f.content), "pointerSize": f.pointer_size} if f.lfs else None,
            }
            for path, f in sorted(files.items())
        ]
        return {
            "id": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": sha,
            "private": repo.private,
            "lastModified": repo.last_modified,
            "tags": [],
            "siblings": siblings,
            "disabled": False,
            "gated": False,
        }

    def tree(self, repo, revision, folder, recursive):
        _, files = repo.resolve(revision)
        prefix = f"{folder.strip('/')}/" if folder.strip("/") else ""
        entries, folders = [], set()
        for path, stored in sorted(files.items()):
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix) :].split("/")
            if recursive:
                folders.update(prefix + "/".join(parts[:depth]) for depth in range(1, len(parts)))
            if recursive or len(parts) == 1:
                entries.append(stored.tree_entry(path))
            else:
                folders.add(prefix + parts[0])
        if prefix and not entries and not folders:
            raise HubError(404, f"{folder} does not exist", "EntryNotFound")
        return [{"type": "directory", "path": p, "oid": git_blob_sha1(p.encode())} for p in sorted(folders)] + entries

    def preupload(self, repo, revision, body):
        sha, files = repo.resolve(revision)
        answers = []
        for item in body["files"]:
            lfs = item["path"].lower().endswith(LFS_SUFFIXES) or item["size"] >= LFS_MIN_SIZE
            remote = files.get(item["path"])
            answers.append(
                {
                    "path": item["path"],
                    "uploadMode": "lfs" if lfs else "regular",
                    "shouldIgnore": False,
                    "oid": remote.etag if remote is not None and remote.lfs == lfs else None,
                }
            )
        return {"files": answers, "commitOid": sha}

    def lfs_batch(self, body):
        objects = []
        for obj in body["objects"]:
            answer = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.lfs_objects:
                answer["actions"] = {
                    "upload": {"href": f"{self.url}/__lfs__/{obj['oid']}"},
                    "verify": {"href": f"{self.url}/__lfs__/verify"},
                }
            objects.append(answer)
        return {"transfer": "basic", "objects": objects, "hash_algo": "sha256"}

    def commit(self, repo, revision, lines):
        header = lines[0]["value"] if lines and lines[0]["key"] == "header" else None
        if header is None or not header.get("summary"):
            raise HubError(400, "A commit needs a header line with a non-empty summary")
        if revision not in repo.branches:
            raise HubError(404, f"Invalid rev id: {revision} (commits go to a branch)", "RevisionNotFound")
        head, files = repo.resolve(revision)
        if header.get("parentCommit") not in (None, head):
            raise HubError(412, f"A commit has happened since {header['parentCommit']}. Please refresh and try again.")
        files = dict(files)
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            if key == "file":
                files[value["path"]] = StoredFile(base64.b64decode(value["content"]), lfs=False)
            elif key == "lfsFile":
                if value["oid"] not in self.lfs_objects:
                    raise HubError(400, f"LFS object {value['oid']} of {value['path']} was never uploaded")
                files[value["path"]] = StoredFile(self.lfs_objects[value["oid"]], lfs=True)
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
            elif key == "deletedFolder":
                files = {p: f for p, f in files.items() if not p.startswith(value["path"].rstrip("/") + "/")}
            else:
                raise HubError(400, f"Unsupported commit operation {key!r}")
        sha = repo.commit(revision, files, header["summary"])
        prefix = "" if repo.repo_type == "model" else f"{repo.repo_type}s/"
        return {
            "commitOid": sha,
            "commitUrl": f"{self.url}/{prefix}{repo.repo_id}/commit/{sha}",
            "pullRequestUrl": None,
            "success": True,
        }

    @staticmethod
    def validate_yaml(body):
        match = re.match(r"^---\n(.*?)\n---\s*\n", body.get("content", "") + "\n", re.S)
        if match is None:
            return {"warnings": [{"message": "empty or missing yaml metadata in repo card"}]}
        try:
            metadata = yaml.safe_load(match.group(1))
        except yaml.YAMLError as error:
            raise HubError(400, "Invalid YAML", body={"errors": [{"message": str(error)}]})
        if not isinstance(metadata, dict):
            raise HubError(400, "Invalid metadata", body={"errors": [{"message": "metadata must be a YAML mapping"}]})
        problems = []
        for key, value in metadata.items():
            if key in ("tags", "datasets", "base_model", "language") and not (
                isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))
            ):
                problems.append(f'"{key}" must be a string or a list of strings')
            if key in ("license", "library_name", "pipeline_tag") and not isinstance(value, str):
                problems.append(f'"{key}" must be a string')
        if "pipeline_tag" in metadata and metadata["pipeline_tag"] not in PIPELINE_TAGS:
            problems.append(f'"pipeline_tag" must be a Hub task, got {metadata["pipeline_tag"]!r}')
        if problems:
            raise HubError(400, "Invalid metadata", body={"errors": [{"message": p} for p in problems]})
        return {"warnings": []}


ROUTES = [  # (method, pattern on the still-quoted path, FakeHub-facing handler)
    ("POST", r"/api/repos/create", "create_repo"),
    ("GET", r"/api/whoami-v2", "whoami"),
    ("POST", r"/api/validate-yaml", "validate_yaml"),
    ("GET", API_REPO + r"(?:/revision/(?P<rev>[^/]+))?", "info"),
    ("GET", API_REPO + r"/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?", "tree"),
    ("POST", API_REPO + r"/preupload/(?P<rev>[^/]+)", "preupload"),
    ("POST", API_REPO + r"/commit/(?P<rev>[^/]+)", "commit"),
    ("POST", API_REPO + r"/branch/(?P<rev>[^/]+)", "create_branch"),
    ("GET", API_REPO + r"/refs", "refs"),
    ("POST", "/" + REPO_PATH + r"\.git/info/lfs/objects/batch", "lfs_batch"),
    ("PUT", r"/__lfs__/(?P<oid>[0-9a-f]{64})", "lfs_upload"),
    ("POST", r"/__lfs__/verify", "lfs_verify"),
    ("GET", "/" + REPO_PATH + r"/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
]


class HubRequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects
    timeout = 10  # an idle keep-alive connection frees its thread after this many seconds

    def log_message(self, format, *args):  # quiet; `FakeHub.requests` keeps the log
        pass

    def do_GET(self):
        self.dispatch("GET")

    def do_HEAD(self):
        self.dispatch("GET", head=True)

    def do_POST(self):
        self.dispatch("POST")

    def do_PUT(self):
        self.dispatch("PUT")

    def dispatch(self, method, head=False):
        hub = self.server.hub
        url = urlsplit(self.path)
        self.query = {key: values[-1] for key, values in parse_qs(url.query).items()}
        self.token = (self.headers.get("Authorization") or "").removeprefix("Bearer ").strip() or None
        self.body, self.head = self.read_body(), head
        hub.requests.append(("HEAD" if head else method, url.path))
        try:
            for route_method, pattern, name in ROUTES:
                match = re.fullmatch(pattern, url.path)
                if match and route_method == method:
                    args = {key: unquote(value) for key, value in match.groupdict().items() if value is not None}
                    # "model" from /api/models/..., "dataset" from /datasets/... (no prefix: a model)
                    args["repo_type"] = args.pop("type", None) or (args.pop("prefix", None) or "models/")[:-2]
                    with hub.lock:
                        return getattr(self, f"handle_{name}")(hub, **args)
            raise HubError(404, f"{method} {url.path} is not served by the test Hub")
        except HubError as error:
            headers = {"X-Error-Message": error.message}
            headers.update({"X-Error-Code": error.code} if error.code else {})
            headers.update({"X-Repo-Commit": error.commit} if error.commit else {})
            self.send_json({"error": error.message, **(error.body or {})}, error.status, headers)
        except Exception as error:  # a malformed request (or a gap in this server): fail fast, never retried
            self.send_json(
                {"error": f"The test Hub could not handle {method} {url.path}: {error!r}"},
                400,
                {"X-Error-Message": "Bad request"},
            )

    def read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def json_body(self):
        try:
            return json.loads(self.body)
        except ValueError as error:
            raise HubError(400, f"Body is not JSON: {error}")

    def send_json(self, payload, status=200, headers=None):
        self.send_bytes(json.dumps(payload).encode(), status, {"Content-Type": "application/json", **(headers or {})})

    def send_bytes(self, content, status=200, headers=None):
        self.send_response(status)
        for key, value in {"Content-Length": str(len(content)), **(headers or {})}.items():
            self.send_header(key, value)
        self.end_headers()
        if not self.head:  # a HEAD answer has the GET headers and no body
            self.wfile.write(content)

    # -- endpoints ------------------------------------------------------------------------------
    def handle_create_repo(self, hub, **_):
        self.send_json(hub.create_repo(self.json_body(), self.token))

    def handle_whoami(self, hub, **_):
        if self.token != hub.token:
            raise HubError(401, "Invalid credentials in Authorization header")
        self.send_json(
            {
                "type": "user",
                "name": hub.user,
                "fullname": "Test User",
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}},
            }
        )

    def handle_validate_yaml(self, hub, **_):
        self.send_json(hub.validate_yaml(self.json_body()))

    def handle_info(self, hub, repo_type, repo, rev="main", **_):
        self.send_json(hub.info(hub.repo(repo_type, repo, self.token), rev))

    def handle_tree(self, hub, repo_type, repo, rev, path="", **_):
        recursive = self.query.get("recursive", "false").lower() in ("1", "true")
        self.send_json(hub.tree(hub.repo(repo_type, repo, self.token), rev, path, recursive))

    def handle_preupload(self, hub, repo_type, repo, rev, **_):
        self.send_json(hub.preupload(hub.repo(repo_type, repo, self.token, write=True), rev, self.json_body()))

    def handle_commit(self, hub, repo_type, repo, rev, **_):
        if "create_pr" in self.query:
            raise HubError(400, "The test Hub does not support pull requests")
        lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
        self.send_json(hub.commit(hub.repo(repo_type, repo, self.token, write=True), rev, lines))

    def handle_create_branch(self, hub, repo_type, repo, rev, **_):
        target = hub.repo(repo_type, repo, self.token, write=True)
        if rev in target.branches:
            raise HubError(409, f"Branch {rev} already exists")
        start = (json.loads(self.body) if self.body else {}).get("startingPoint") or "main"
        target.branches[rev] = target.resolve(start)[0]
        self.send_json({})

    def handle_refs(self, hub, repo_type, repo, **_):
        branches = hub.repo(repo_type, repo, self.token).branches
        self.send_json(
            {
                "branches": [
                    {"name": name, "ref": f"refs/heads/{name}", "targetCommit": sha}
                    for name, sha in sorted(branches.items())
                ],
                "converts": [],
                "tags": [],
                "pullRequests": [],
            }
        )

    def handle_lfs_batch(self, hub, repo_type, repo, **_):
        hub.repo(repo_type, repo, self.token, write=True)
        self.send_bytes(
            json.dumps(hub.lfs_batch(self.json_body())).encode(),
            headers={"Content-Type": "application/vnd.git-lfs+json"},
        )

    def handle_lfs_upload(self, hub, oid, **_):
        if hashlib.sha256(self.body).hexdigest() != oid:
            raise HubError(400, f"Uploaded content does not match sha256 {oid}")
        hub.lfs_objects[oid] = self.body
        self.send_bytes(b"", headers={"ETag": f'"{oid}"'})

    def handle_lfs_verify(self, hub, **_):
        body = self.json_body()
        if body["oid"] not in hub.lfs_objects or len(hub.lfs_objects[body["oid"]]) != body["size"]:
            raise HubError(404, f"LFS object {body['oid']} is missing or has the wrong size")
        self.send_json({"success": True})

    def handle_resolve(self, hub, repo_type, repo, rev, path, **_):
        sha, files = hub.repo(repo_type, repo, self.token).resolve(rev)
        if path not in files:
            raise HubError(404, f"{path} does not exist at {rev}", "EntryNotFound", commit=sha)
        stored = files[path]
        headers = {
            "X-Repo-Commit": sha,
            "ETag": f'"{stored.etag}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        content, status = stored.content, 200
        ranged = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if ranged and not self.head:
            start, end = int(ranged.group(1)), int(ranged.group(2) or len(content) - 1)
            headers["Content-Range"] = f"bytes {start}-{min(end, len(content) - 1)}/{len(content)}"
            content, status = content[start : end + 1], 206
        self.send_bytes(content, status, headers)


class _ThreadingServer(ThreadingHTTPServer):
    daemon_threads = False  # `server_close` joins the handler threads

    def __init__(self, address, hub):
        super().__init__(address, HubRequestHandler)
        self.hub, self.connections = hub, set()

    def process_request(self, request, client_address):
        self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        self.connections.discard(request)
        super().shutdown_request(request)


class HubServer:
    """Runs a `FakeHub` on `host` (a free port by default) in a background thread."""

    def __init__(self, host="127.0.0.1", port=0, token="hf_test", user="test-user"):
        self.hub = FakeHub(token=token, user=user)
        self.httpd = _ThreadingServer((host, port), self.hub)
        self.url = self.hub.url = f"http://{host}:{self.httpd.server_address[1]}"
        self.token, self.user, self.thread = token, user, None

    def start(self):
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        return self

    def stop(self):
        if self.thread is None:
            return
        self.httpd.shutdown()
        for connection in list(self.httpd.connections):  # wake handlers waiting on keep-alive connections
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.httpd.server_close()
        self.thread.join()
        self.thread = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()

    def files(self, repo_id, revision="main", repo_type="model"):
        """`{path: bytes}` of a repo at `revision` (for assertions)."""
        with self.hub.lock:
            return {path: f.content for path, f in self.hub.repos[(repo_type, repo_id)].resolve(revision)[1].items()}
