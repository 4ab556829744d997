"""Hostile dataset rows against a real agent process, on the postgres backend and on Supabase.

Each row is what anyone holding the app's public key could insert. Every one must end `failed`
with a short message and no Python frames, the agent must stay up, the user's files must stay as
they were, nothing may be written outside the agent's folders, and a valid run queued behind the
corpus must still complete.
"""

from __future__ import annotations

import http.server
import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from supabase import acreate_client

from agent.datasets.synthetic import make_dataset
from tests.acceptance.agentproc import AgentProc, base_env, insert_run, wait_status
from tests.acceptance.test_supabase_agent import Project, agent_env, project, upload_dataset
from tests.datasets.test_guards import BILLION_LAUGHS
from tests.util import wait_for_sync

__all__ = ["project"]  # the Supabase stand-in fixture, shared with the Supabase acceptance tests

pytestmark = pytest.mark.slow

# Not a model anyone could have: the corpus must fail on its dataset, never get to train.
CONFIG = {"epochs": 1, "imgSize": 64, "batchSize": 2, "device": "cpu", "workers": 0, "plots": False}
FAKE = {"trainer": "fake", "epochs": 1, "fakeEpochSeconds": 0.05}


@dataclass
class Corpus:
    root: Path  # DATASET_ROOT: what the operator allowed
    private: Path  # the host user's files, outside the root
    site: Path  # served over HTTP on 127.0.0.1
    url: str
    closed_port: int


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class _Hostile(http.server.SimpleHTTPRequestHandler):
    """A dataset server with redirects into places datasets may not come from, and bad listings."""

    def do_GET(self) -> None:
        redirects = {
            "/redirect-metadata/data.yaml": "http://169.254.169.254/latest/meta-data/iam/",
            "/redirect-file/data.yaml": "file:///etc/passwd",
            "/redirect-loop/data.yaml": "/redirect-loop/data.yaml",
        }
        if self.path in redirects:
            self.send_response(302)
            self.send_header("Location", redirects[self.path])
            self.end_headers()
            return
        if self.path.startswith("/dotdot/") and self.path.endswith("/"):
            hrefs = (
                "../",
                "../../../etc/passwd.jpg",
                "..%2F..%2Fsecret.jpg",
                "/etc/",
                "http://10.0.0.1/x.jpg",
            )
            body = "".join(f'<a href="{h}">{h}</a>\n' for h in hrefs).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        super().do_GET()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def corpus(tmp_path: Path) -> Iterator[Corpus]:
    root, private, site = tmp_path / "datasets", tmp_path / "home" / "user", tmp_path / "site"
    make_dataset(private / "photos", "detect", train=4, val=2, imgsz=32)
    (private / "id_rsa").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nsecret\n")
    good = make_dataset(root / "good", "detect", train=4, val=2, imgsz=32)

    base = {
        p.relative_to(good.parent).as_posix(): p.read_bytes() for p in good.parent.rglob("*") if p.is_file()
    }
    # Each copy is its own dataset: the generated YAML's `path:` names the original's folder.
    base["data.yaml"] = b"train: images/train\nval: images/val\nnames: [circle, square, triangle]\n"

    def dataset(name: str, yaml_text: str | None = None, files: dict[str, bytes | str] | None = None) -> None:
        """A copy of the good dataset under the root, with some files replaced."""
        folder = root / name
        for rel, content in {**base, **(files or {})}.items():
            path = folder / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content if isinstance(content, bytes) else content.encode())
        if yaml_text is not None:
            (folder / "data.yaml").write_text(yaml_text)

    splits = "train: images/train\nval: images/val\n"
    dataset("bomb", BILLION_LAUGHS + splits + "names: [a]\n")
    dataset(
        "tags", "train: !!python/object/apply:os.system ['touch /tmp/pwned']\nval: images/val\nnames: [a]\n"
    )
    dataset("deep", "train: " + "[" * 200 + "]" * 200 + "\nval: images/val\nnames: [a]\n")
    dataset("huge", "names: [a]\n" + splits + "# " + "x" * (2 * 1024 * 1024) + "\n")
    originals = [p.relative_to(good.parent) for p in good.parent.glob("images/*/*")]
    bad_labels = "9 2.0 -1 nan inf\nnot a label\n"
    dataset("badlabels", None, {f"labels/{p.parent.name}/{p.stem}.txt": bad_labels for p in originals})
    dataset("corrupt", None, {p.as_posix(): b"\x00garbage, not an image" for p in originals})
    escape = "../../home/user/photos/images/train/train_00000.jpg\n"
    dataset("listdotdot", "train: train.txt\nval: images/val\nnames: [a, b, c]\n", {"train.txt": escape})
    dataset("pathescape", f"path: {private / 'photos'}\n{splits}names: [a, b, c]\n")
    dataset("symlinked")
    os.symlink(private / "photos" / "images" / "train", root / "symlinked" / "images" / "more")
    (root / "symlinked" / "data.yaml").write_text("train: images/more\nval: images/val\nnames: [a, b, c]\n")
    (root / "secret.yaml").symlink_to(private / "photos" / "data.yaml")

    site.mkdir()
    for name in ("bomb", "tags", "dotdot"):
        (site / name).mkdir()
    (site / "bomb" / "data.yaml").write_text(BILLION_LAUGHS + splits)
    (site / "tags" / "data.yaml").write_text("train: !!python/name:os.system\nval: v\nnames: [a]\n")
    (site / "dotdot" / "data.yaml").write_text(splits + "names: [a]\n")
    handler = lambda *a, **k: _Hostile(*a, directory=str(site), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Corpus(root, private, site, f"http://127.0.0.1:{server.server_address[1]}", _closed_port())
    finally:
        server.shutdown()
        server.server_close()


def local_rows(c: Corpus) -> dict[str, str]:
    """Rows both backends refuse the same way: local paths, schemes, metadata and unknown hosts."""
    return {
        "relative traversal": "../../../../etc/passwd",
        "absolute outside the root": "/etc/passwd",
        "the user's dataset outside the root": str(c.private / "photos" / "data.yaml"),
        "dot-dot through the root": f"{c.root}/../home/user/photos/data.yaml",
        "file URL": "file:///etc/passwd",
        "symlinked YAML": "secret.yaml",
        "symlinked split folder": "symlinked/data.yaml",
        "YAML path: outside": "pathescape/data.yaml",
        "list file with ..": "listdotdot/data.yaml",
        "billion laughs": "bomb/data.yaml",
        "python tag": "tags/data.yaml",
        "deep nesting": "deep/data.yaml",
        "2 MB YAML": "huge/data.yaml",
        "bad labels": "badlabels/data.yaml",
        "corrupt images": "corrupt/data.yaml",
        "ftp": "ftp://127.0.0.1/pub/data.yaml",
        "gopher": "gopher://127.0.0.1:70/_GET%20/",
        "data URL": "data:text/yaml;base64,dHJhaW46IC9ldGM=",
        "unresolvable host": "https://datasets.nowhere.invalid/d/data.yaml",
        "metadata endpoint": "http://169.254.169.254/latest/meta-data/data.yaml",
        "IPv6 metadata endpoint": "http://[fd00:ec2::254]/latest/data.yaml",
        "percent-encoded traversal": "%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "very long path": "a/" * 20_000 + "data.yaml",
    }


def run_corpus(database_url: str, agent: AgentProc, rows: dict[str, str], secrets: list[str]) -> None:
    ids = {
        name: insert_run(database_url, CONFIG, data_yaml=v, base_model="YOLOv8n") for name, v in rows.items()
    }
    valid = insert_run(database_url, FAKE, data_yaml="good/data.yaml")
    done = wait_status(database_url, valid, "completed", "failed", timeout=240)
    assert done["status"] == "completed", done["error_message"]
    problems: list[str] = []
    for name, run_id in ids.items():
        row = wait_status(database_url, run_id, "completed", "failed", "canceled", timeout=60)
        message = row["error_message"] or ""
        if row["status"] != "failed":
            problems.append(f"{name}: {row['status']}")
        if not message or len(message) >= 2000:
            problems.append(f"{name}: message of {len(message)} characters")
        if "Traceback" in message or 'File "' in message:
            problems.append(f"{name}: Python frames in {message[:300]!r}")
        if any(s in message for s in secrets):
            problems.append(f"{name}: a secret in {message[:300]!r}")
    assert problems == [], "\n".join(problems)
    assert agent.proc.poll() is None, "the agent stopped"
    assert [r for r in agent.records() if r.get("message") == "run pipeline crashed"] == []


def tree(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in sorted(root.rglob("*"))
    }


def test_hostile_rows_on_the_postgres_backend(database_url: str, tmp_path: Path, corpus: Corpus) -> None:
    home = tmp_path / "agent-home"
    home.mkdir()
    rows = {
        **local_rows(corpus),
        "loopback": f"{corpus.url}/bomb/data.yaml",
        "a name for loopback": corpus.url.replace("127.0.0.1", "localhost") + "/tags/data.yaml",
        "closed port": f"http://127.0.0.1:{corpus.closed_port}/d/data.yaml",
        "private network": "http://10.0.0.1/d/data.yaml",
        "IPv6 loopback": f"http://[::1]:{corpus.closed_port}/d/data.yaml",
        "storage without Supabase": "storage:datasets/p/data.yaml",
    }
    before = tree(tmp_path / "home"), tree(corpus.root)
    env = base_env(
        database_url,
        tmp_path / "agent",
        DATASET_ROOT=str(corpus.root),
        ALLOW_FAKE_TRAINER="1",
        HOME=str(home),
        XDG_CONFIG_HOME=str(home / ".config"),
        XDG_CACHE_HOME=str(home / ".cache"),
    )
    agent = AgentProc(env, tmp_path / "agent.log").start()
    try:
        agent.wait_ready(60)
        run_corpus(database_url, agent, rows, [])
        assert (tree(tmp_path / "home"), tree(corpus.root)) == before, "the user's files changed"
        assert list(home.iterdir()) == [], "the agent wrote outside its folders"
        assert not Path("/tmp/pwned").exists()
        # Nothing of the corpus stays behind in the workspaces.
        runs = tmp_path / "agent" / "runs"
        wait_for_sync(lambda: not list(runs.glob("*")), timeout=10, what="workspaces removed")
    finally:
        agent.kill()


async def test_hostile_rows_on_supabase(
    database_url: str, tmp_path: Path, corpus: Corpus, project: Project
) -> None:
    app = await acreate_client(project.url, project.service_role_key)
    good = make_dataset(tmp_path / "upload" / "good", "detect", train=4, val=2, imgsz=32)
    await upload_dataset(app, good.parent)
    await upload_dataset(app, good.parent, bucket="private")
    bucket = app.storage.from_("datasets")
    await bucket.upload("evil/data.yaml", b"train: images/train\nval: images/val\nnames: [a]\n")
    await bucket.upload("evil/manifest.txt", b"../good/images/train/train_00000.jpg\n../../private/x.jpg\n")
    await bucket.upload("bomb/data.yaml", BILLION_LAUGHS.encode() + b"train: a\nval: b\n")
    host = project.url.rstrip("/")
    rows = {
        **local_rows(corpus),
        "other bucket": "storage:private/good/data.yaml",
        "other bucket by URL": f"{host}/storage/v1/object/public/private/good/data.yaml",
        "signed URL of another bucket": f"{host}/storage/v1/object/sign/private/good/data.yaml?token=x",
        "not Storage on the project host": f"{host}/rest/v1/training_runs",
        "manifest entries with ..": "storage:datasets/evil/data.yaml",
        "billion laughs in Storage": "storage:datasets/bomb/data.yaml",
        "redirect to metadata": f"{corpus.url}/redirect-metadata/data.yaml",
        "redirect to file:": f"{corpus.url}/redirect-file/data.yaml",
        "redirect loop": f"{corpus.url}/redirect-loop/data.yaml",
        "billion laughs over HTTP": f"{corpus.url}/bomb/data.yaml",
        "tag over HTTP": f"{corpus.url}/tags/data.yaml",
        "listing entries with ..": f"{corpus.url}/dotdot/data.yaml",
        "closed port": f"http://127.0.0.1:{corpus.closed_port}/d/data.yaml",
    }
    home = tmp_path / "agent-home"
    home.mkdir()
    before = tree(tmp_path / "home"), tree(corpus.root)
    env = agent_env(
        project,
        tmp_path / "agent",
        "gpu-hostile",
        DATASET_ROOT=str(corpus.root),
        # The test's own dataset server is on 127.0.0.1: allowed, so its redirects and bodies are tested.
        ALLOW_PRIVATE_DATASET_URLS="true",
        ALLOW_FAKE_TRAINER="1",
        HOME=str(home),
        XDG_CONFIG_HOME=str(home / ".config"),
        XDG_CACHE_HOME=str(home / ".cache"),
    )
    agent = AgentProc(env, tmp_path / "agent.log").start()
    try:
        agent.wait_ready(60)
        run_corpus(database_url, agent, rows, [project.service_role_key])
        assert (tree(tmp_path / "home"), tree(corpus.root)) == before, "the user's files changed"
        assert list(home.iterdir()) == [], "the agent wrote outside its folders"
        logged = (tmp_path / "agent.log").read_text(errors="replace")
        assert project.service_role_key not in logged
    finally:
        agent.kill()
