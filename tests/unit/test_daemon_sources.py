"""The daemon's manifest sources: a watched folder, and a polled (and watched) git branch.

Real git repositories in tmp_path and real watchdog observers; waits are bounded
threading.Event waits, never sleeps standing in for correctness.
"""

from __future__ import annotations

import os
import queue
import subprocess
import threading
import time
from pathlib import Path

import pytest

from reconciler.daemon import _sources as sources
from reconciler.daemon._sources import FolderSource, GitSource, Snapshot, SourceError
from reconciler.errors import ReconcilerError

WAIT_S = 10.0

# watchdog's inotify emitter can warn when `mkdir -p` races its own recursive walk (harmless)
pytestmark = pytest.mark.filterwarnings("ignore:Callback with id:RuntimeWarning")


class Calls:
    """A changed() callback that counts calls and lets a test wait for the next one."""

    def __init__(self) -> None:
        self.count = 0
        self._cond = threading.Condition()

    def __call__(self) -> None:
        with self._cond:
            self.count += 1
            self._cond.notify_all()

    def wait_for(self, n: int, timeout: float = WAIT_S) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.count >= n, timeout)


# ---------------------------------------------------------------------------------------
# folder


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    d = tmp_path / "cloud"
    _write(d / "web.yaml", "a: 1\n")
    _write(d / "sub" / "db.yml", "b: 2\n")
    return d


@pytest.fixture
def folder_source(folder: Path):
    src = FolderSource(folder, debounce_s=0.2)
    yield src
    src.close()


def test_folder_revision_follows_manifests_only(folder: Path, folder_source: FolderSource) -> None:
    snap = folder_source.latest()
    assert snap.revision.startswith("sha256:") and len(snap.revision) == len("sha256:") + 16
    assert snap.root == folder and snap.summary == ""
    assert folder_source.description == f"folder {folder}"
    assert folder_source.latest().revision == snap.revision  # stable

    (folder / "README.txt").write_text("not a manifest\n")
    _write(folder / ".hidden" / "x.yaml", "c: 3\n")
    _write(folder / "sub" / ".git" / "y.yaml", "c: 3\n")
    (folder / ".dot.yaml").write_text("c: 3\n")
    assert folder_source.latest().revision == snap.revision

    (folder / "sub" / "db.yml").write_text("b: 3\n")
    changed = folder_source.latest().revision
    assert changed != snap.revision
    (folder / "sub" / "db.yml").rename(folder / "db.yml")  # same bytes, another path
    assert folder_source.latest().revision not in (snap.revision, changed)


def test_folder_display_keeps_the_file_as_given(folder: Path, folder_source: FolderSource) -> None:
    snap = folder_source.latest()
    assert snap.display(str(folder / "sub" / "db.yml")) == str(folder / "sub" / "db.yml")
    assert snap.display("/elsewhere/x.yaml") == "/elsewhere/x.yaml"


def test_folder_missing_is_a_source_error(tmp_path: Path) -> None:
    src = FolderSource(tmp_path / "nope")
    with pytest.raises(SourceError, match="manifest folder .*nope does not exist"):
        src.latest()
    (tmp_path / "file").write_text("")
    with pytest.raises(SourceError, match="not a folder"):
        FolderSource(tmp_path / "file").latest()


def test_folder_burst_of_writes_calls_changed_once(
    folder: Path, folder_source: FolderSource
) -> None:
    calls = Calls()
    folder_source.start(calls)
    for i in range(5):
        (folder / "web.yaml").write_text(f"a: {i}\n")
    assert calls.wait_for(1), "changed() was not called"
    time.sleep(0.2 * 2 + 0.3)  # after the debounce: no second call
    assert calls.count == 1


def test_folder_save_via_rename_is_seen(folder: Path, folder_source: FolderSource) -> None:
    calls = Calls()
    folder_source.start(calls)
    tmp = folder / "sub" / ".db.yml.swp"  # hidden and not a manifest: only the rename counts
    tmp.write_text("b: 9\n")
    os.replace(tmp, folder / "sub" / "db.yml")
    assert calls.wait_for(1), "a save via rename was not seen"


def test_folder_new_subfolder_is_seen(folder: Path, folder_source: FolderSource) -> None:
    calls = Calls()
    folder_source.start(calls)
    _write(folder / "new" / "deep" / "n.yaml", "n: 1\n")
    assert calls.wait_for(1)


def test_folder_ignores_non_manifests_and_hidden_folders(
    folder: Path, folder_source: FolderSource
) -> None:
    calls = Calls()
    folder_source.start(calls)
    (folder / "README.txt").write_text("hello\n")
    (folder / "web.yaml.tmp").write_text("a: 5\n")
    _write(folder / ".git" / "objects" / "x.yaml", "x\n")
    (folder / ".hidden.yaml").write_text("x\n")
    time.sleep(0.2 + 0.5)  # a negative: give a wrong call its chance
    assert calls.count == 0
    (folder / "web.yaml").write_text("a: 6\n")  # and it still works afterwards
    assert calls.wait_for(1)


def test_folder_swapped_symlink_and_recreated_folder_are_seen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sources, "_RECHECK_S", 0.2)  # how often the folder's identity is checked
    v1, v2 = tmp_path / "releases" / "v1", tmp_path / "releases" / "v2"
    _write(v1 / "a.yaml", "a: 1\n")
    _write(v2 / "a.yaml", "a: 2\n")
    link = tmp_path / "current"
    link.symlink_to(v1)
    src = FolderSource(link, debounce_s=0.1)
    try:
        calls = Calls()
        src.start(calls)
        before = src.latest()
        assert before.root == link
        (v1 / "a.yaml").write_text("a: 11\n")  # events arrive through the link's target
        assert calls.wait_for(1)
        tmp_link = tmp_path / "current.new"
        tmp_link.symlink_to(v2)
        os.replace(tmp_link, link)  # an atomic deploy: swap the link
        assert calls.wait_for(2), "a swapped symlink was not noticed"
        assert src.latest().revision != before.revision
        (v2 / "a.yaml").write_text("a: 22\n")  # and the new target is watched
        assert calls.wait_for(3)
        link.unlink()
        assert calls.wait_for(4), "a removed folder was not noticed"
        with pytest.raises(SourceError):
            src.latest()
        _write(link / "b.yaml", "b: 1\n")  # a real folder now
        assert calls.wait_for(5), "a recreated folder was not noticed"
        n = calls.count
        (link / "b.yaml").write_text("b: 2\n")
        assert calls.wait_for(n + 1), "the recreated folder is not watched"
    finally:
        src.close()


def test_folder_close_is_idempotent_and_quick(folder: Path) -> None:
    src = FolderSource(folder)
    src.close()  # never started
    src = FolderSource(folder)
    src.start(Calls())
    src.close()
    src.close()


# ---------------------------------------------------------------------------------------
# git


@pytest.fixture(autouse=True)
def git_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """An isolated git: no user/system config, fixed identity, no proxies."""
    for var in ("http_proxy", "https_proxy", "all_proxy",
                "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    values = {
        "GIT_CONFIG_GLOBAL": "/dev/null",
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_AUTHOR_NAME": "Test",
        "GIT_AUTHOR_EMAIL": "test@example.invalid",
        "GIT_COMMITTER_NAME": "Test",
        "GIT_COMMITTER_EMAIL": "test@example.invalid",
        "NO_PROXY": "*",
        "no_proxy": "*",
    }
    for k, v in values.items():
        monkeypatch.setenv(k, v)
    return values


def git(repo: Path, *args: str) -> str:
    out = subprocess.run(
        ["git", "-C", str(repo), *args], check=True, capture_output=True, text=True,
        stdin=subprocess.DEVNULL,
    )
    return out.stdout.strip()


def commit(repo: Path, files: dict[str, str | None], message: str) -> str:
    for name, text in files.items():
        if text is None:
            (repo / name).unlink()
        else:
            _write(repo / name, text)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "HEAD")


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    r = tmp_path / "repo"
    subprocess.run(["git", "init", "-q", "-b", "main", str(r)], check=True,
                   stdin=subprocess.DEVNULL)
    commit(r, {"top.yaml": "t: 1\n", "cloud/web.yaml": "w: 1\n", "cloud/README.md": "r\n"},
           "first commit\n\nbody text")
    return r


@pytest.fixture
def make_source(tmp_path: Path):
    made: list[GitSource] = []

    def make(url: str | Path, **kw) -> GitSource:
        kw.setdefault("cache_dir", tmp_path / "cache")
        kw.setdefault("timeout_s", 20.0)
        src = GitSource(str(url), **kw)
        made.append(src)
        return src

    yield make
    for src in made:
        src.close()


def test_git_latest_is_the_head_commit_checked_out(
    repo: Path, make_source, tmp_path: Path
) -> None:
    src = make_source(repo)
    snap = src.latest()
    assert snap.revision == git(repo, "rev-parse", "HEAD")
    assert snap.summary == "first commit"
    assert snap.root == tmp_path / "cache" / "checkouts" / snap.revision
    assert (snap.root / "top.yaml").read_text() == "t: 1\n"
    assert (snap.root / "cloud" / "web.yaml").read_text() == "w: 1\n"
    assert snap.display(str(snap.root / "cloud" / "web.yaml")) == "cloud/web.yaml"
    assert src.description == f"git {repo} branch main"
    assert src.latest() == snap  # the same commit: the same checkout


def test_git_path_selects_a_subfolder(repo: Path, make_source) -> None:
    src = make_source(repo, path="./cloud/")
    assert src.description == f"git {repo} branch main path cloud"
    snap = src.latest()
    assert snap.root.name == "cloud" and snap.root.parent.name == snap.revision
    assert sorted(p.name for p in snap.root.iterdir()) == ["README.md", "web.yaml"]
    assert not (snap.root.parent / "top.yaml").exists()  # only `path` is extracted
    assert snap.display_root == "cloud"
    assert snap.display(str(snap.root / "web.yaml")) == "cloud/web.yaml"
    assert snap.display("/other/web.yaml") == "/other/web.yaml"


def test_git_file_url_and_other_branch(repo: Path, make_source) -> None:
    git(repo, "checkout", "-q", "-b", "feature/x")
    sha = commit(repo, {"f.yaml": "f: 1\n"}, "on a feature")
    git(repo, "checkout", "-q", "main")
    snap = make_source(f"file://{repo}", branch="feature/x").latest()
    assert snap.revision == sha and (snap.root / "f.yaml").is_file()


def test_git_new_commit_new_checkout_old_kept_until_keep(repo: Path, make_source) -> None:
    src = make_source(repo)
    old = src.latest()
    new_sha = commit(repo, {"cloud/web.yaml": "w: 2\n", "top.yaml": None}, "second")
    new = src.latest()
    assert new.revision == new_sha != old.revision
    assert (new.root / "cloud" / "web.yaml").read_text() == "w: 2\n"
    assert not (new.root / "top.yaml").exists()
    # the old checkout is intact
    assert (old.root / "cloud" / "web.yaml").read_text() == "w: 1\n"
    assert (old.root / "top.yaml").is_file()
    stale = old.root.parent / ".tmp-leftover"
    stale.mkdir()
    src.keep([new.revision])
    assert not old.root.exists() and not stale.exists()
    assert (new.root / "cloud" / "web.yaml").is_file()
    assert sorted(p.name for p in new.root.parent.iterdir()) == [new.revision]


def test_git_checkout_is_redone_when_path_changes(repo: Path, make_source) -> None:
    first = make_source(repo, path="cloud").latest()
    assert not (first.root.parent / "top.yaml").exists()
    whole = make_source(repo).latest()  # same cache, same commit, another path
    assert whole.revision == first.revision
    assert (whole.root / "top.yaml").is_file()


def test_git_export_attributes_do_not_alter_files(repo: Path, make_source) -> None:
    commit(repo, {".gitattributes": "*.yaml export-subst\nsecret.yaml export-ignore\n",
                  "subst.yaml": "v: $Format:%H$\n", "secret.yaml": "s: 1\n"}, "attributes")
    snap = make_source(repo).latest()
    assert (snap.root / "subst.yaml").read_text() == "v: $Format:%H$\n"
    assert (snap.root / "secret.yaml").is_file()


def test_git_missing_branch(repo: Path, make_source) -> None:
    src = make_source(repo, branch="nosuch")
    with pytest.raises(SourceError, match=f"branch 'nosuch' does not exist in {repo}"):
        src.latest()


def test_git_path_not_in_commit(repo: Path, make_source) -> None:
    src = make_source(repo, path="nowhere")
    sha = git(repo, "rev-parse", "HEAD")
    with pytest.raises(SourceError, match=f"path 'nowhere' is not in commit {sha[:7]} of main"):
        src.latest()


def test_git_unreachable_local_path(tmp_path: Path, make_source) -> None:
    src = make_source(tmp_path / "does-not-exist")
    with pytest.raises(SourceError, match="cannot fetch branch 'main' from .*does-not-exist"):
        src.latest()


def test_git_credentials_are_redacted(make_source) -> None:
    src = make_source("https://user:secret@127.0.0.1:9/x.git", timeout_s=10.0)
    assert "secret" not in src.description
    assert src.description == "git https://user:***@127.0.0.1:9/x.git branch main"
    with pytest.raises(SourceError) as info:
        src.latest()
    assert "secret" not in str(info.value)
    assert "127.0.0.1:9" in str(info.value)
    token = make_source("https://ghp_tokenvalue@127.0.0.1:9/x.git", timeout_s=10.0)
    assert "tokenvalue" not in token.description
    with pytest.raises(SourceError) as info:
        token.latest()
    assert "tokenvalue" not in str(info.value)


@pytest.mark.parametrize("branch", ["-x", "a..b", "", "a b", "x.lock", "/a", "a/", "a//b",
                                    "HEAD", "a@{1}", "a:b", ".a", "a/.b", "a.", "refs/heads/x"])
def test_git_invalid_branch_refused(branch: str, tmp_path: Path) -> None:
    with pytest.raises(ReconcilerError, match="invalid git branch name"):
        GitSource("/x", branch=branch, cache_dir=tmp_path)


@pytest.mark.parametrize("branch", ["main", "feature/x", "release-1.2", "a_b", "v1@2"])
def test_git_valid_branch_accepted(branch: str, tmp_path: Path) -> None:
    assert GitSource("/x", branch=branch, cache_dir=tmp_path).branch == branch


@pytest.mark.parametrize("path", ["../x", "/abs", "a/../../b", "a/.."])
def test_git_invalid_path_refused(path: str, tmp_path: Path) -> None:
    with pytest.raises(ReconcilerError, match="invalid path"):
        GitSource("/x", path=path, cache_dir=tmp_path)


@pytest.mark.parametrize("url", ["ext::sh -c touch% /tmp/pwned", "fd::3", "-uhoh", "foo://x/y"])
def test_git_dangerous_urls_refused(url: str, tmp_path: Path) -> None:
    with pytest.raises(ReconcilerError):
        GitSource(url, cache_dir=tmp_path)


@pytest.mark.parametrize("target", ["/etc/passwd", "../../../../../../../etc/passwd"])
def test_git_escaping_symlink_refused(repo: Path, make_source, target: str) -> None:
    (repo / "cloud" / "evil.yaml").symlink_to(target)
    commit(repo, {}, "a link out")
    src = make_source(repo, path="cloud")
    with pytest.raises(SourceError, match="refusing commit .*cloud/evil.yaml"):
        src.latest()
    # nothing left behind: no checkout, no temp folder
    assert list((src.cache_dir / "checkouts").iterdir()) == []


def test_git_symlink_inside_checkout_allowed(repo: Path, make_source) -> None:
    (repo / "cloud" / "alias.yaml").symlink_to("web.yaml")
    commit(repo, {}, "a link in")
    snap = make_source(repo, path="cloud").latest()
    assert (snap.root / "alias.yaml").read_text() == "w: 1\n"


class FakeSleep:
    """Stands in for the poll loop's wait: each call blocks until the test says go/stop."""

    def __init__(self) -> None:
        self.entered = threading.Semaphore(0)
        self.replies: queue.Queue[bool] = queue.Queue()

    def __call__(self, seconds: float) -> bool:
        self.entered.release()
        return self.replies.get(timeout=WAIT_S)

    def next_poll(self) -> None:
        self.replies.put(False)
        assert self.entered.acquire(timeout=WAIT_S), "the poll loop did not come back to sleep"


def test_git_poll_calls_changed_on_first_poll_and_head_changes(repo: Path, make_source) -> None:
    sleep = FakeSleep()
    src = make_source(repo, interval_s=3600, sleep=sleep)
    calls = Calls()
    src.start(calls)
    assert sleep.entered.acquire(timeout=WAIT_S)
    assert calls.count == 1  # first poll
    sleep.next_poll()
    assert calls.count == 1  # same head
    commit(repo, {"cloud/web.yaml": "w: 3\n"}, "third")
    sleep.next_poll()
    assert calls.count == 2  # head moved
    sleep.next_poll()
    assert calls.count == 2
    sleep.replies.put(True)  # closed: the loop ends
    src.close()


def test_git_poll_errors_are_retried_not_raised(tmp_path: Path, repo: Path, make_source) -> None:
    sleep = FakeSleep()
    gone = tmp_path / "gone"
    src = make_source(gone, interval_s=3600, sleep=sleep)
    calls = Calls()
    src.start(calls)
    assert sleep.entered.acquire(timeout=WAIT_S)
    assert calls.count == 1  # the first poll reports, so the daemon reads (and shows the error)
    sleep.next_poll()
    assert calls.count == 1
    repo.rename(gone)  # the repository appears
    sleep.next_poll()
    assert calls.count == 2
    sleep.replies.put(True)
    src.close()


def test_git_local_commit_seen_without_waiting_for_interval(repo: Path, make_source) -> None:
    src = make_source(repo, interval_s=3600)
    calls = Calls()
    src.start(calls)
    assert calls.wait_for(1), "no first poll"
    commit(repo, {"cloud/web.yaml": "w: 4\n"}, "fourth")
    assert calls.wait_for(2), "a local commit was not noticed (ref watcher)"
    t0 = time.monotonic()
    src.close()
    assert time.monotonic() - t0 < 5


def test_git_local_bare_repo_push_seen(repo: Path, tmp_path: Path, make_source) -> None:
    bare = tmp_path / "bare.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(repo), str(bare)], check=True,
                   stdin=subprocess.DEVNULL)
    src = make_source(bare, interval_s=3600)
    calls = Calls()
    src.start(calls)
    assert calls.wait_for(1)
    commit(repo, {"cloud/web.yaml": "w: 5\n"}, "fifth")
    git(repo, "push", "-q", str(bare), "main")
    assert calls.wait_for(2), "a push into a local bare repository was not noticed"
    assert src.latest().revision == git(repo, "rev-parse", "HEAD")


def test_git_close_without_start_and_twice(repo: Path, make_source) -> None:
    src: GitSource = make_source(repo)
    src.close()
    src.close()


def test_snapshot_display_rules() -> None:
    snap = Snapshot(revision="a" * 40, root=Path("/c/aaa/cloud"), display_root="cloud")
    assert snap.display("/c/aaa/cloud/x/y.yaml") == "cloud/x/y.yaml"
    assert snap.display("/c/aaa/other.yaml") == "/c/aaa/other.yaml"
    top = Snapshot(revision="a" * 40, root=Path("/c/aaa"), display_root="")
    assert top.display("/c/aaa/x.yaml") == "x.yaml"


def test_git_cache_is_private(repo: Path, make_source, tmp_path: Path) -> None:
    """The cache holds every manifest (userData, a secret) in git's objects and the URL in
    FETCH_HEAD, readable by anyone through a world-traversable cache directory: the cache
    directory is the daemon's alone (0700), also when an older version made it 0755."""
    commit(repo, {"vm.yaml": "userData: |\n  password: rc-canary-0002\n"}, "a secret")
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o755)
    os.chmod(cache, 0o755)
    make_source(repo).latest()
    assert cache.stat().st_mode & 0o777 == 0o700
    objects = subprocess.run(["git", "-C", str(cache / "repo.git"), "cat-file", "--batch-all-objects",
                              "--batch"], check=True, capture_output=True, stdin=subprocess.DEVNULL).stdout
    assert b"rc-canary-0002" in objects  # what the 0700 protects
