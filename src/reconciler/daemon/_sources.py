"""Where `reconciler daemon` reads its manifests from: a folder, or a branch of a git repository.

A source hands out :class:`Snapshot` s (a revision id and a folder to load) and tells the
daemon, through a cheap `changed()` callback, when a new one *may* be available; the daemon
then calls :meth:`Source.latest` and compares revisions.

- :class:`FolderSource` watches a folder with watchdog (inotify), debounced, and names a
  revision by a hash of the manifest files' paths and contents (the loader's file selection).
- :class:`GitSource` keeps a bare repository cache, fetches one branch (polling every
  `interval_s`, and at once when a local repository's refs change), and extracts each
  commit once, safely, into `cache_dir/checkouts/<sha>`.

Errors reading a source are :class:`SourceError`: the daemon keeps its last good revision
and tries again. Every message naming a git URL has its credentials redacted.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Callable, Iterable, Protocol
from urllib.parse import unquote, urlsplit

import structlog
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from reconciler.errors import ReconcilerError
from reconciler.loader import MANIFEST_SUFFIXES, find_manifest_files

log = structlog.get_logger("reconciler.daemon")


class SourceError(ReconcilerError):
    """The source cannot be read now (git unreachable, folder missing): the daemon keeps the
    last good revision and retries."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One revision of the manifests, ready for the loader."""

    revision: str  # git: the 40-hex commit id; folder: "sha256:" + 16 hex of the manifests
    root: Path  # the folder to hand to the loader for this revision
    display_root: str  # prefix of file names for users: git -> `path` in the repo ("" = top)
    summary: str = ""  # git: the commit's subject line; folder: ""

    def display(self, file: str) -> str:
        """A file under `root` as users know it: git -> path relative to the repository
        root (e.g. 'cloud/web.yaml'); folder -> the file as given (an absolute path under
        the watched folder). Files outside `root` are returned unchanged."""
        try:
            rel = Path(file).relative_to(self.root)
        except ValueError:
            return file
        if self.display_root == str(self.root):  # a folder: names are already what users know
            return file
        name = rel.as_posix()
        if not self.display_root:
            return name
        return self.display_root if name == "." else f"{self.display_root}/{name}"


class Source(Protocol):
    description: str  # e.g. "folder /srv/cloud" or "git /srv/repo.git branch main path cloud"

    def start(self, changed: Callable[[], None]) -> None:
        """Begin watching; call changed() (from any thread, cheap) whenever a new snapshot
        MAY be available."""

    def latest(self) -> Snapshot:
        """Read / fetch now (raises SourceError with a clear message)."""

    def keep(self, revisions: Iterable[str]) -> None:
        """May delete cached snapshots other than these."""

    def close(self) -> None:
        """Stop watchers and threads; idempotent; returns when stopped."""


# ---------------------------------------------------------------------------------------
# shared helpers


def _call(changed: Callable[[], None], what: str) -> None:
    try:
        changed()
    except Exception:  # a callback's bug must not kill a watcher thread
        log.exception("source changed() callback failed", source=what)


class _Debouncer:
    """Calls `fn` once, `delay` seconds after the last of a burst of `poke()` s."""

    def __init__(self, delay: float, fn: Callable[[], None], name: str):
        self._delay = delay
        self._fn = fn
        self._cond = threading.Condition()
        self._due: float | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def poke(self) -> None:
        with self._cond:
            self._due = time.monotonic() + self._delay
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed:
                    if self._due is None:
                        self._cond.wait()
                        continue
                    remaining = self._due - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                if self._closed:
                    return
                self._due = None
            self._fn()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not threading.current_thread():
            self._thread.join()


def _event_paths(event: FileSystemEvent) -> list[str]:
    paths = [os.fsdecode(event.src_path)]
    if event.event_type == "moved" and event.dest_path:
        paths.append(os.fsdecode(event.dest_path))
    return paths


class _Handler(FileSystemEventHandler):
    def __init__(self, relevant: Callable[[FileSystemEvent], bool], poke: Callable[[], None]):
        self._relevant = relevant
        self._poke = poke

    def on_any_event(self, event: FileSystemEvent) -> None:
        try:
            if self._relevant(event):
                self._poke()
        except Exception:  # never let the observer thread die
            log.exception("file event handling failed", event=repr(event))


def _stop_observer(observer: Observer | None) -> None:
    if observer is None:
        return
    try:
        observer.stop()
    except Exception:
        log.exception("stopping a file watcher failed")
    if observer.is_alive() and observer is not threading.current_thread():
        observer.join()


# ---------------------------------------------------------------------------------------
# folder


_FILE_EVENTS = frozenset({"created", "modified", "deleted", "moved", "attrib"})
_DIR_EVENTS = frozenset({"created", "deleted", "moved"})  # "modified" of a folder = a child's
_RECHECK_S = 1.0  # how often the folder's identity is checked (deleted, recreated, swapped)
_UNWATCHED_POLL_S = 5.0  # changed() this often when the folder cannot be watched


def _hidden(rel: PurePosixPath | Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


class FolderSource:
    """Manifests in a folder on this host, watched with watchdog (inotify)."""

    def __init__(self, path: Path, *, debounce_s: float = 0.25):
        self.path = Path(os.path.abspath(path))
        self.description = f"folder {self.path}"
        self._debounce_s = debounce_s
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._observer: Observer | None = None
        self._debouncer: _Debouncer | None = None
        self._thread: threading.Thread | None = None
        self._watched: str | None = None  # the real path being watched
        self._started = False

    # -- reading

    def latest(self) -> Snapshot:
        for _attempt in range(3):
            if not self.path.exists():
                raise SourceError(f"manifest folder {self.path} does not exist")
            if not self.path.is_dir():
                raise SourceError(f"manifest folder {self.path} is not a folder")
            files, _problems = find_manifest_files([self.path])
            try:
                revision = self._hash(files)
            except FileNotFoundError:
                continue  # a file went away while reading: list again
            return Snapshot(revision=revision, root=self.path, display_root=str(self.path))
        raise SourceError(f"manifest folder {self.path} keeps changing while being read")

    def _hash(self, files: list[Path]) -> str:
        digest = hashlib.sha256()
        for file in files:
            rel = file.relative_to(self.path).as_posix().encode("utf-8", "surrogateescape")
            try:
                data = file.read_bytes()
            except FileNotFoundError:
                raise
            except OSError as exc:  # unreadable: the loader reports it; the hash notes it
                data = f"\0unreadable: {exc.strerror or exc}".encode()
            digest.update(b"%d\0%s\0%d\0" % (len(rel), rel, len(data)))
            digest.update(data)
        return "sha256:" + digest.hexdigest()[:16]

    def keep(self, revisions: Iterable[str]) -> None:
        return None

    # -- watching

    def start(self, changed: Callable[[], None]) -> None:
        with self._lock:
            if self._started:
                raise RuntimeError(f"{self.description}: already started")
            self._started = True
            self._changed = changed
            self._debouncer = _Debouncer(
                self._debounce_s, lambda: _call(changed, self.description), "folder-debounce"
            )
            self._observer = Observer()
            self._handler = _Handler(self._relevant, self._debouncer.poke)
            self._watch = None
            identity = self._identity()
            self._rewatch(identity)
            self._observer.start()
            self._thread = threading.Thread(
                target=self._supervise, args=(identity,), name="folder-source", daemon=True
            )
            self._thread.start()

    def _identity(self) -> tuple[str, int, int] | None:
        """The folder's real path and inode: a change means deleted, recreated or swapped."""
        try:
            real = os.path.realpath(self.path)
            st = os.stat(real)
        except OSError:
            return None
        if not os.path.isdir(real):
            return None
        return real, st.st_dev, st.st_ino

    def _rewatch(self, identity: tuple[str, int, int] | None) -> bool:
        """Watch the folder `identity` names (unwatching the old one); False if impossible."""
        assert self._observer is not None
        if self._watch is not None:
            try:
                self._observer.unschedule(self._watch)
            except Exception:  # its emitter may be gone already (folder deleted)
                pass
            self._watch = None
            self._watched = None
        if identity is None:
            return True
        try:
            self._watch = self._observer.schedule(self._handler, identity[0], recursive=True)
        except OSError as exc:
            log.warning(
                "cannot watch the manifest folder; polling it",
                source=self.description,
                error=str(exc),
                every_s=_UNWATCHED_POLL_S,
            )
            return False
        self._watched = identity[0]
        return True

    def _supervise(self, identity: tuple[str, int, int] | None) -> None:
        watching = identity is None or self._watch is not None
        last_poll = time.monotonic()
        while not self._stop.wait(_RECHECK_S):
            now = self._identity()
            if now != identity:
                identity = now
                with self._lock:
                    if self._stop.is_set():
                        return
                    watching = self._rewatch(now)
                _call(self._changed, self.description)
                last_poll = time.monotonic()
            elif not watching and time.monotonic() - last_poll >= _UNWATCHED_POLL_S:
                _call(self._changed, self.description)
                last_poll = time.monotonic()

    def _relevant(self, event: FileSystemEvent) -> bool:
        watched = self._watched
        if event.is_directory:
            if event.event_type not in _DIR_EVENTS:
                return False
        elif event.event_type not in _FILE_EVENTS:
            return False
        for path in _event_paths(event):
            try:
                rel = Path(path).relative_to(watched) if watched else Path(path)
            except ValueError:
                return True  # moved in or out of the folder
            if _hidden(rel):
                continue
            if event.is_directory or rel.suffix in MANIFEST_SUFFIXES:
                return True
        return False

    def close(self) -> None:
        with self._lock:
            self._stop.set()
            observer, self._observer = self._observer, None
            debouncer, self._debouncer = self._debouncer, None
            thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        _stop_observer(observer)
        if debouncer is not None:
            debouncer.close()


# ---------------------------------------------------------------------------------------
# git


_HEX40 = re.compile(r"[0-9a-f]{40}")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_SCP_LIKE = re.compile(r"^(?:[^@/:\s]+@)?(?:\[[^\]/]+\]|[^@/:\s]+):(?!//)")
_ALLOWED_SCHEMES = frozenset({"https", "http", "ssh", "git", "file"})
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/@\s]*)@")
# repository-locating variables from a surrounding git (a hook, a test) must not leak in
_GIT_ENV_DROP = frozenset(
    {
        "GIT_DIR",
        "GIT_WORK_TREE",
        "GIT_INDEX_FILE",
        "GIT_OBJECT_DIRECTORY",
        "GIT_ALTERNATE_OBJECT_DIRECTORIES",
        "GIT_COMMON_DIR",
        "GIT_NAMESPACE",
        "GIT_PREFIX",
        "GIT_QUARANTINE_PATH",
        "GIT_CEILING_DIRECTORIES",
        "GIT_DISCOVERY_ACROSS_FILESYSTEM",
    }
)
# checkouts hold the committed bytes: no export-subst/ident expansion, no export-ignore, no
# filters (git archive reads .gitattributes from the commit; $GIT_DIR/info/attributes wins)
_ATTRIBUTES = "* -export-subst -export-ignore -ident -filter -text -working-tree-encoding\n"
_MARKER = ".reconciler-checkout"  # in each checkout: the `path` it holds
_TMP_PREFIX = ".tmp-"
_STDERR_LINES = 5
_REF_DEBOUNCE_S = 0.2


def _redact_url(text: str) -> str:
    def sub(m: re.Match[str]) -> str:
        scheme, info = m.group("scheme"), m.group("userinfo")
        if ":" in info:
            return f"{scheme}{info.split(':', 1)[0]}:***@"
        if scheme.lower().startswith("http"):
            return f"{scheme}***@"  # a token given as the user name
        return m.group(0)

    return _USERINFO.sub(sub, text)


def validate_branch(branch: str) -> str:
    """`git check-ref-format --branch` rules, plus: no leading '-', not 'HEAD'."""

    def bad(why: str) -> ReconcilerError:
        return ReconcilerError(f"invalid git branch name {branch!r}: {why}")

    if not branch:
        raise bad("it is empty")
    if branch.startswith("-"):
        raise bad("it starts with '-'")
    if branch == "HEAD" or branch == "@":
        raise bad("it is not a branch name")
    if branch.startswith("refs/"):
        raise bad("give the branch name without 'refs/' (e.g. 'main')")
    if any(ord(c) < 0x20 or c == "\x7f" for c in branch) or any(c in branch for c in " ~^:?*[\\"):
        raise bad("it contains a space, a control character or one of ~ ^ : ? * [ \\")
    if ".." in branch:
        raise bad("it contains '..'")
    if "@{" in branch:
        raise bad("it contains '@{'")
    if branch.startswith("/") or branch.endswith("/") or "//" in branch:
        raise bad("it has an empty component ('/' at the start or end, or '//')")
    if branch.endswith("."):
        raise bad("it ends with '.'")
    for part in branch.split("/"):
        if part.startswith("."):
            raise bad(f"component {part!r} starts with '.'")
        if part.endswith(".lock"):
            raise bad(f"component {part!r} ends with '.lock'")
    return branch


def validate_path(path: str) -> str:
    """A folder inside the repository, normalised ('./cloud/' -> 'cloud', '.' -> '')."""
    if "\0" in path or "\\" in path:
        raise ReconcilerError(f"invalid path {path!r} in the git repository: bad character")
    if path.startswith("/"):
        raise ReconcilerError(
            f"invalid path {path!r} in the git repository: it must be relative to the "
            "repository's top folder (no leading '/')"
        )
    parts = [p for p in PurePosixPath(path).parts if p != "."]
    if ".." in parts:
        raise ReconcilerError(f"invalid path {path!r} in the git repository: '..' is not allowed")
    return "/".join(parts)


def _normalise_url(url: str) -> tuple[str, Path | None]:
    """(the URL to fetch, the local repository folder when there is one)."""
    if not url or url.startswith("-") or any(ord(c) < 0x20 for c in url):
        raise ReconcilerError(f"invalid git repository URL {_redact_url(url)!r}")
    scheme = _SCHEME.match(url)
    if scheme:
        name = scheme.group(1).lower()
        if name not in _ALLOWED_SCHEMES:
            raise ReconcilerError(
                f"unsupported git URL scheme {name!r} in {_redact_url(url)!r} "
                f"(use one of {', '.join(sorted(_ALLOWED_SCHEMES))}, or a local path)"
            )
        local = None
        if name == "file":
            candidate = Path(unquote(urlsplit(url).path))
            local = candidate if candidate.is_dir() else None
        return url, local
    if os.path.isdir(url):
        path = os.path.abspath(url)
        return path, Path(path)
    if "::" in url.split("/", 1)[0]:
        raise ReconcilerError(
            f"unsupported git URL {_redact_url(url)!r} (remote helpers are not allowed)"
        )
    if _SCP_LIKE.match(url):
        return url, None  # [user@]host:path (ssh)
    return os.path.abspath(url), None  # a local path, maybe not there yet


def _git_dir_of(repo: Path) -> Path | None:
    """The folder holding a local repository's refs (bare, .git folder or .git file)."""
    try:
        if (repo / "HEAD").is_file() and (repo / "refs").is_dir():
            return repo
        dot = repo / ".git"
        if dot.is_dir():
            return dot
        if dot.is_file():
            line = dot.read_text().strip()
            if line.startswith("gitdir:"):
                gitdir = (repo / line[len("gitdir:"):].strip()).resolve()
                common = gitdir / "commondir"
                if common.is_file():
                    return (gitdir / common.read_text().strip()).resolve()
                return gitdir
    except OSError:
        return None
    return None


def _git_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _GIT_ENV_DROP}
    env.update(GIT_TERMINAL_PROMPT="0", GIT_ASKPASS="/bin/true", LC_ALL="C")
    return env


def _tail(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " / ".join(lines[-_STDERR_LINES:]) or "(no message)"


class GitSource:
    """One branch of a git repository (optionally a folder in it), polled and cached."""

    def __init__(
        self,
        url: str,
        *,
        branch: str = "main",
        path: str = "",
        interval_s: float = 30.0,
        cache_dir: Path,
        timeout_s: float = 120.0,
        sleep: Callable[[float], bool] | None = None,
    ):
        self.branch = validate_branch(branch)
        self.path = validate_path(path)
        self.url, self._local = _normalise_url(url)
        self._secrets = self._secrets_of(self.url)
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.cache_dir = Path(os.path.abspath(cache_dir))
        self.repo = self.cache_dir / "repo.git"
        self.checkouts = self.cache_dir / "checkouts"
        self.description = self._redact(
            f"git {self.url} branch {self.branch}" + (f" path {self.path}" if self.path else "")
        )
        self._ref = f"refs/heads/{self.branch}"
        self._lock = threading.Lock()  # one git operation on the cache at a time
        self._state = threading.Lock()  # start/close bookkeeping
        self._closed = threading.Event()
        self._wake = threading.Event()
        self._sleep = sleep or self._default_sleep
        self._procs: set[subprocess.Popen[bytes]] = set()
        self._thread: threading.Thread | None = None
        self._observer: Observer | None = None
        self._debouncer: _Debouncer | None = None
        self._started = False

    # -- messages

    @staticmethod
    def _secrets_of(url: str) -> list[str]:
        try:
            parts = urlsplit(url)
        except ValueError:
            return []
        found = []
        if parts.password:
            found.append(parts.password)
        elif parts.username and parts.scheme.lower().startswith("http"):
            found.append(parts.username)
        found += [unquote(s) for s in found]
        return sorted({s for s in found if len(s) >= 4}, key=len, reverse=True)

    def _redact(self, text: str) -> str:
        text = _redact_url(text)
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    # -- running git

    def _git(self, *args: str, what: str, timeout: float | None = None) -> str:
        """Run git on the cache repository; its stdout, or SourceError."""
        cmd = ["git", "-c", "protocol.ext.allow=never", "-C", str(self.repo), *args]
        try:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=_git_env(),
                start_new_session=True,  # so a timeout ends its helpers too (ssh, remote-https)
            )
        except OSError as exc:
            raise SourceError(f"cannot run git ({what}): {exc.strerror or exc}") from None
        self._procs.add(proc)
        try:
            try:
                out, err = proc.communicate(timeout=timeout or self.timeout_s)
            except subprocess.TimeoutExpired:
                self._kill(proc)
                proc.communicate()
                raise SourceError(
                    self._redact(f"{what}: git did not finish within {self.timeout_s:g} s")
                ) from None
        finally:
            self._procs.discard(proc)
        if proc.returncode != 0:
            if self._closed.is_set():
                raise SourceError(f"{what}: interrupted (source closed)")
            raise _GitFailed(self._redact(_tail(err.decode("utf-8", "replace"))))
        return out.decode("utf-8", "replace")

    @staticmethod
    def _kill(proc: subprocess.Popen[bytes]) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: git and its helpers only
        except OSError:
            pass

    def _ensure_repo(self) -> None:
        try:  # the daemon's alone: it holds the manifests (userData) and, in FETCH_HEAD, the URL
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            os.chmod(self.cache_dir, 0o700)
        except OSError as exc:
            raise SourceError(
                f"cannot create the git cache {self.cache_dir}: {exc.strerror or exc}") from None
        if (self.repo / "HEAD").is_file():
            return
        try:
            self.checkouts.mkdir(parents=True, exist_ok=True)
            result = subprocess.run(
                ["git", "init", "--bare", "--quiet", str(self.repo)],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                env=_git_env(),
                timeout=self.timeout_s,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise SourceError(f"cannot create the git cache {self.repo}: {exc}") from None
        if result.returncode != 0:
            raise SourceError(
                f"cannot create the git cache {self.repo}: "
                f"{_tail(result.stderr.decode('utf-8', 'replace'))}"
            )
        info = self.repo / "info"
        info.mkdir(exist_ok=True)
        (info / "attributes").write_text(_ATTRIBUTES)

    def _fetch_head(self) -> str:
        """Fetch the branch into the cache; its head commit. Call with self._lock held."""
        self._ensure_repo()
        spec = f"+{self._ref}:{self._ref}"
        try:
            self._git("fetch", "--no-tags", "--prune", "--force", "--", self.url, spec,
                      what=f"fetching branch {self.branch!r} from {self.url}")
        except _GitFailed as exc:
            msg = str(exc)
            if "couldn't find remote ref" in msg.lower():
                raise SourceError(
                    self._redact(f"branch {self.branch!r} does not exist in {self.url}")
                ) from None
            raise SourceError(
                self._redact(f"cannot fetch branch {self.branch!r} from {self.url}: {msg}")
            ) from None
        try:
            sha = self._git("rev-parse", "--verify", "--quiet", f"{self._ref}^{{commit}}",
                            what="reading the fetched branch").strip()
        except _GitFailed:
            raise SourceError(
                self._redact(f"branch {self.branch!r} of {self.url} does not name a commit")
            ) from None
        if not _HEX40.fullmatch(sha):
            raise SourceError(f"unexpected commit id {sha!r} for branch {self.branch!r}")
        return sha

    # -- snapshots

    def latest(self) -> Snapshot:
        with self._lock:
            sha = self._fetch_head()
            short = sha[:7]
            if self.path:
                try:
                    kind = self._git("cat-file", "-t", f"{sha}:{self.path}",
                                     what="looking up the path").strip()
                except _GitFailed:
                    kind = ""
                if kind not in ("tree", "blob"):
                    raise SourceError(
                        f"path {self.path!r} is not in commit {short} of {self.branch}"
                    )
            checkout = self._checkout(sha)
            try:
                subject = self._git("log", "-1", "--format=%s", sha, what="reading the commit")
            except _GitFailed:
                subject = ""
            lines = subject.splitlines()
            return Snapshot(
                revision=sha,
                root=checkout / self.path if self.path else checkout,
                display_root=self.path,
                summary=lines[0][:200] if lines else "",
            )

    def _checkout(self, sha: str) -> Path:
        final = self.checkouts / sha
        if final.is_dir() and not final.is_symlink():
            try:
                if (final / _MARKER).read_text() == self.path + "\n":
                    return final
            except OSError:
                pass
            self._remove(final)  # made for another `path` (config changed since)
        self.checkouts.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=self.checkouts))
        try:
            self._extract(sha, tmp)
            marker = tmp / _MARKER
            if marker.exists() or marker.is_symlink():
                marker.unlink()
            marker.write_text(self.path + "\n")
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    def _extract(self, sha: str, dest: Path) -> None:
        """`git archive` of the commit (only `path`) into `dest`, with tarfile's 'data' filter."""
        cmd = ["git", "-C", str(self.repo), "archive", "--format=tar", sha, "--", self.path or "."]
        what = f"commit {sha[:7]} of branch {self.branch}"
        with tempfile.TemporaryFile() as errfile:
            try:
                proc = subprocess.Popen(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=errfile,
                    env=_git_env(),
                    start_new_session=True,
                )
            except OSError as exc:
                raise SourceError(f"cannot run git archive: {exc.strerror or exc}") from None
            self._procs.add(proc)
            timed_out = threading.Event()

            def expire() -> None:
                timed_out.set()
                self._kill(proc)

            timer = threading.Timer(self.timeout_s, expire)
            timer.daemon = True
            timer.start()
            problem: str | None = None
            try:
                stream: IO[bytes] = proc.stdout  # type: ignore[assignment]
                with tarfile.open(fileobj=stream, mode="r|") as tar:
                    tar.extractall(dest, filter="data")
            except tarfile.FilterError as exc:
                problem = (
                    f"refusing {what}: {exc} (files and links must stay inside the checkout)"
                )
            except (tarfile.TarError, OSError) as exc:
                problem = f"cannot extract {what}: {exc}"
            finally:
                timer.cancel()
                if proc.stdout is not None:
                    proc.stdout.close()
                if problem is not None:
                    self._kill(proc)
                proc.wait()
                self._procs.discard(proc)
            errfile.seek(0)
            err = errfile.read().decode("utf-8", "replace")
        if timed_out.is_set():
            raise SourceError(f"extracting {what}: git did not finish within {self.timeout_s:g} s")
        if problem is None and proc.returncode != 0:
            problem = f"cannot extract {what}: {_tail(err)}"
        if problem is not None:
            raise SourceError(self._redact(problem))

    def keep(self, revisions: Iterable[str]) -> None:
        wanted = set(revisions)
        with self._lock:
            try:
                entries = list(self.checkouts.iterdir())
            except FileNotFoundError:
                return
            for entry in entries:
                name = entry.name
                if name in wanted:
                    continue
                if _HEX40.fullmatch(name) or name.startswith(_TMP_PREFIX):
                    self._remove(entry)

    def _remove(self, entry: Path) -> None:
        try:
            if entry.is_symlink() or not entry.is_dir():
                entry.unlink()
                return
            trash = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=self.checkouts))
            os.rename(entry, trash / "old")  # gone from its name at once
            shutil.rmtree(trash)
        except OSError as exc:
            log.warning("cannot remove an old checkout", source=self.description,
                        checkout=str(entry), error=str(exc))

    # -- watching

    def _default_sleep(self, seconds: float) -> bool:
        self._wake.wait(seconds)
        self._wake.clear()
        return self._closed.is_set()

    def start(self, changed: Callable[[], None]) -> None:
        with self._state:
            if self._started:
                raise RuntimeError(f"{self.description}: already started")
            if self._closed.is_set():
                raise RuntimeError(f"{self.description}: closed")
            self._started = True
            self._watch_local_repo()
            self._thread = threading.Thread(
                target=self._poll, args=(changed,), name="git-source", daemon=True
            )
            self._thread.start()

    def _poll(self, changed: Callable[[], None]) -> None:
        last: str | None = None
        first = True
        while not self._closed.is_set():
            try:
                with self._lock:
                    head = self._fetch_head()
            except Exception as exc:
                head = None
                if not self._closed.is_set():
                    log.warning("git poll failed; retrying", source=self.description,
                                error=self._redact(str(exc)), retry_in_s=self.interval_s)
            if self._closed.is_set():
                return
            if first or (head is not None and head != last):
                _call(changed, self.description)
            first = False
            if head is not None:
                last = head
            if self._sleep(self.interval_s):
                return

    def _watch_local_repo(self) -> None:
        if self._local is None:
            return
        gitdir = _git_dir_of(self._local)
        if gitdir is None:
            return
        self._gitdir = gitdir
        self._debouncer = _Debouncer(_REF_DEBOUNCE_S, self._wake.set, "git-ref-debounce")
        handler = _Handler(self._ref_event, self._debouncer.poke)
        observer = Observer()
        try:
            observer.schedule(handler, str(gitdir), recursive=False)
            for sub in ("refs", "reftable"):
                if (gitdir / sub).is_dir():
                    observer.schedule(handler, str(gitdir / sub), recursive=True)
            observer.start()
        except OSError as exc:
            log.warning("cannot watch the local repository; polling only",
                        source=self.description, error=str(exc))
            return
        self._observer = observer

    def _ref_event(self, event: FileSystemEvent) -> bool:
        for path in _event_paths(event):
            try:
                rel = Path(path).relative_to(self._gitdir).as_posix()
            except ValueError:
                continue
            if rel.endswith(".lock"):
                continue
            if rel in ("HEAD", "packed-refs") or rel.startswith(("refs/heads/", "reftable/")):
                return True
        return False

    def close(self) -> None:
        with self._state:
            self._closed.set()
            self._wake.set()
            thread, self._thread = self._thread, None
            observer, self._observer = self._observer, None
            debouncer, self._debouncer = self._debouncer, None
        for proc in list(self._procs):
            self._kill(proc)
        _stop_observer(observer)
        if debouncer is not None:
            debouncer.close()
        if thread is not None and thread is not threading.current_thread():
            thread.join()


class _GitFailed(Exception):
    """git exited non-zero (message: its redacted stderr tail)."""
