"""Fetching the files a registry entry needs from the Hugging Face Hub, verifying them, finding them offline.

Files go through huggingface_hub so they share its cache (`HF_HOME`, `HF_HUB_CACHE`) with every other tool, or
into a plain folder with `--dir` (laid out as `<dir>/<owner>/<repo>/<path>`). Only the files an entry names are
requested, never a whole repository listing of `nvidia/PiD`. Each file is checked against the size and SHA-256
(git blob id for small non-LFS files) that the Hub reports for it, plus any values pinned in the registry; a
mismatch deletes the copy and raises. A successful check leaves a stamp in pid's cache dir so later runs do not
re-hash gigabytes.

Environment is read at call time (not import time) so `HF_ENDPOINT`, `HF_HUB_CACHE`, `HF_HUB_OFFLINE` and
`HF_TOKEN` behave the same for the CLI, for library callers and in tests.

Resuming: an LFS file (every weight file) that is not on disk yet is transferred by pid with huggingface_hub's
`http_get` into a partial file named by the file and its ETag (the SHA-256 of its content):
`models--<owner>--<repo>/blobs/<key>.<etag>.incomplete` in the HF cache, `<dir>/<owner>/<repo>/.cache/pid/`
with `--dir`. It outlives the process (Ctrl-C, kill -9, a connection still broken after huggingface_hub's 5
in-call retries), and the next run continues it with `Range: bytes=<size>-`. Bytes reach the disk in
huggingface_hub's read size (10 MB), so a kill loses at most that much. A partial file of another version (the
ETag changed) is deleted and the file fetched whole; a finished transfer must hash to the ETag before it is moved
into place, so a damaged partial file is deleted and the file fetched again from the start, never loaded. These
transfers use plain HTTP even for Xet-backed repos (no hf_xet). Non-LFS files (small configs) are left to
hf_hub_download, which in 2.x does not resume across runs: it writes each attempt to a temporary file of its own
and deletes it on failure (a killed process leaves it behind, unused).

Confinement: a repo id, file path or revision becomes a local path, so each is checked (`check_remote_path`)
where it enters, the Hub's folder listings included, and again before any download, before a byte is written: a
mirror that lists `../../x.safetensors`, an absolute path, a backslash, a drive letter, an empty component or a
control character is refused with an error naming the repo and the path.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

from pid_cli import paths
from pid_cli.registry import (
    IMAGE_ENCODER_KINDS,
    Entry,
    FileRef,
    Licence,
    RepoRef,
    entry_id_problem,
    path_problem,
    repo_id_problem,
)

_TRUE = {"1", "on", "yes", "true"}
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_GIT_OID_RE = re.compile(r"^[0-9a-f]{40}$")
_CHUNK = 8 << 20

LICENCE_NOTICE = (
    "Licence: PiD decoder weights are NVIDIA's, under the {name}{url}: non-commercial use only. "
    "The paired VAE/encoder and text-encoder weights have their own licences (see their model cards)."
)


class HubError(RuntimeError):
    """A Hub request failed in a way the user can act on (auth, missing file, no connection)."""


class MissingFilesError(HubError):
    """Files are not on disk and cannot be fetched (offline mode, local file gone)."""

    def __init__(self, message: str, files: Sequence[str], command: str | None):
        super().__init__(message)
        self.files = list(files)
        self.command = command


class VerificationError(HubError):
    """A file's size or hash differs from what the Hub (or the registry) says it should be."""


# ---------------------------------------------------------------------------------------------------------
# Environment


def is_offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE")
    if value is not None:
        return value.strip().lower() in _TRUE
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_endpoint() -> str:
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def hub_cache_dir() -> Path:
    if value := os.environ.get("HF_HUB_CACHE"):
        return Path(value).expanduser()
    if value := os.environ.get("HF_HOME"):
        return Path(value).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


@dataclass(frozen=True)
class Settings:
    """Where files live and how to reach the Hub; `from_env` fills the gaps from the environment."""

    endpoint: str
    cache_dir: Path  # the Hugging Face hub cache (used unless local_dir is set)
    local_dir: Path | None = None
    offline: bool = False
    token: str | None = None  # None: huggingface_hub reads HF_TOKEN / the saved login itself

    @classmethod
    def from_env(cls, local_dir: str | os.PathLike[str] | None = None, offline: bool | None = None,
                 token: str | None = None) -> Settings:
        return cls(hub_endpoint(), hub_cache_dir(), Path(local_dir).expanduser().resolve() if local_dir else None,
                   is_offline() if offline is None else offline, token)

    def repo_dir(self, repo: str) -> Path:
        assert self.local_dir is not None
        check_remote_path(repo)
        return self.local_dir / repo

    def repo_file(self, repo: str, path: str) -> Path:
        """`<dir>/<owner>/<repo>/<path>`, refused (HubError) unless it stays inside the repo's folder."""
        check_remote_path(repo, path)
        return self.repo_dir(repo) / path


def check_remote_path(repo: str, path: str | None = None, revision: str | None = None, *, source: str = "") -> None:
    """Refuse a repo id, file path or revision that would not stay inside its folder once it is a local path.

    The registry checks its own values, but paths also come from the Hub's listings (an HF_ENDPOINT mirror may
    list `../../x.safetensors`) and from library callers' FileRefs, so every download checks again before a
    byte is written: `<dir>/<owner>/<repo>/<path>`, the cache's snapshots/<commit>/<path> and refs/<revision>."""
    if (problem := repo_id_problem(repo)) is not None:
        raise HubError(f"{repo!r}: refusing this repo id{source}: {problem}")
    for label, value in (("file path", path), ("revision", revision)):
        if value is not None and (problem := path_problem(value)) is not None:
            raise HubError(f"{repo}: refusing the {label} {value!r}{source}: it {problem}; every file must stay "
                           "inside the repository's folder")


# ---------------------------------------------------------------------------------------------------------
# Remote metadata


@dataclass(frozen=True)
class RemoteFile:
    """What the Hub reports for one file: LFS files have a SHA-256, small files only a git blob id."""

    path: str
    size: int
    sha256: str | None
    git_oid: str | None


def _remote_file(info: Any) -> RemoteFile:
    lfs = getattr(info, "lfs", None)
    sha = (lfs.get("sha256") or lfs.get("oid")) if isinstance(lfs, dict) else getattr(lfs, "sha256", None)
    return RemoteFile(info.path, int(lfs["size"] if lfs else info.size), sha, None if lfs else info.blob_id)


def _api(settings: Settings) -> Any:
    from huggingface_hub import HfApi

    return HfApi(endpoint=settings.endpoint, token=settings.token)


def _hub_call(what: str, settings: Settings, fn: Callable[[], Any]) -> Any:
    """Run a huggingface_hub call, turning its errors into messages that say what to do."""
    from huggingface_hub.utils import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return fn()
    except GatedRepoError as exc:
        raise HubError(f"{what}: the repository is gated; accept its terms on the Hub and set HF_TOKEN") from exc
    except RepositoryNotFoundError as exc:
        raise HubError(f"{what}: repository not found at {settings.endpoint}, or it needs a token "
                       "(set HF_TOKEN)") from exc
    except RevisionNotFoundError as exc:
        raise HubError(f"{what}: revision not found on the Hub") from exc
    except LocalEntryNotFoundError as exc:
        raise HubError(f"{what}: cannot reach the Hub at {settings.endpoint} and the file is not cached "
                       "(check the connection, or set HF_HUB_OFFLINE=1 to use only cached files)") from exc
    except OfflineModeIsEnabled as exc:
        raise HubError(f"{what}: huggingface_hub is in offline mode (HF_HUB_OFFLINE)") from exc
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", "?")
        if status == 404:
            raise HubError(f"{what}: not found on the Hub (HTTP 404)") from exc
        raise HubError(f"{what}: Hub request failed (HTTP {status}): {str(exc).splitlines()[0]}") from exc
    except OSError as exc:
        if "Consistency check failed" in str(exc):
            raise VerificationError(f"{what}: the transfer's size does not match the size the Hub reports; "
                                    "nothing was kept, run the command again") from exc
        raise HubError(f"{what}: {exc}") from exc
    except Exception as exc:
        if type(exc).__module__.startswith(("httpx", "requests", "urllib3")):
            raise HubError(f"{what}: cannot reach the Hub at {settings.endpoint}: {exc}") from exc
        raise


def _is_connection_error(exc: BaseException) -> bool:
    """True when the Hub could not be reached at all (as opposed to answering with an HTTP error)."""
    from huggingface_hub.utils import HfHubHTTPError

    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, HfHubHTTPError) or type(cause).__name__ == "HTTPStatusError":
            return False
        if isinstance(cause, (ConnectionError, TimeoutError)) or type(cause).__module__.startswith(
                ("httpx", "requests", "urllib3")):
            return True
        cause = cause.__cause__
    return False


def remote_files(repo: str, revision: str, files: Sequence[str], settings: Settings) -> dict[str, RemoteFile]:
    """Size and hashes of specific files (one `paths-info` request, no repository listing)."""
    infos = _hub_call(f"{repo}@{revision}", settings,
                      lambda: _api(settings).get_paths_info(repo, list(files), revision=revision))
    return {i.path: _remote_file(i) for i in infos if hasattr(i, "blob_id") or hasattr(i, "lfs")}


def remote_repo_files(ref: RepoRef, settings: Settings) -> dict[str, RemoteFile]:
    """Files of a model folder (text encoder) that match its allow patterns."""
    from huggingface_hub.hf_api import RepoFile

    assert ref.repo is not None
    tree = _hub_call(ref.repo, settings, lambda: list(
        _api(settings).list_repo_tree(ref.repo, recursive=True, revision=ref.revision)))
    found = {f.path: _remote_file(f) for f in tree if isinstance(f, RepoFile) and _matches(f.path, ref)}
    for path in found:  # before any of them is fetched: the listing is the mirror's word, not the registry's
        check_remote_path(ref.repo, path, source=f" listed by the Hub at {settings.endpoint}")
    if not found:
        raise HubError(f"{ref.repo}: no files match {', '.join(ref.allow_patterns)}")
    return found


def _matches(path: str, ref: RepoRef) -> bool:
    return any(fnmatch.fnmatch(path, pattern) for pattern in ref.allow_patterns)


# ---------------------------------------------------------------------------------------------------------
# Verification


def _stamp_file(path: Path) -> Path:
    key = hashlib.sha1(str(path.resolve()).encode()).hexdigest()
    return paths.cache_dir() / "verified" / f"{key}.json"


def _read_stamp(path: Path) -> dict[str, Any] | None:
    try:
        stamp = json.loads(_stamp_file(path).read_text())
        st = path.stat()
    except (OSError, ValueError):
        return None
    if stamp.get("size") != st.st_size or stamp.get("mtime_ns") != st.st_mtime_ns:
        return None
    return stamp


def _write_stamp(path: Path, sha256: str | None, git_oid: str | None) -> None:
    st = path.stat()
    stamp = {"file": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
             "sha256": sha256, "git_oid": git_oid}
    target = _stamp_file(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(stamp))
        os.replace(tmp, target)
    except OSError:
        pass  # a read-only cache only costs a re-hash next time


def file_digests(path: Path, git: bool = False) -> tuple[str, str | None]:
    """SHA-256 of the file and, on request, its git blob id (what the Hub reports for non-LFS files)."""
    sha = hashlib.sha256()
    blob = hashlib.sha1(f"blob {path.stat().st_size}\0".encode()) if git else None
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            sha.update(chunk)
            if blob is not None:
                blob.update(chunk)
    return sha.hexdigest(), blob.hexdigest() if blob is not None else None


def sha256_of(path: Path) -> str:
    """SHA-256 of a file, from its verification stamp when it has a current one (no re-hashing)."""
    stamp = _read_stamp(path)
    if stamp and stamp.get("sha256"):
        return str(stamp["sha256"])
    sha, _ = file_digests(path)
    _write_stamp(path, sha, None)
    return sha


def _discard(path: Path) -> None:
    """Remove a bad copy, including the blob behind a Hugging Face cache symlink."""
    target = path.resolve()
    for p in {path, target}:
        p.unlink(missing_ok=True)


def _etag_sha256(path: Path) -> str | None:
    """In the HF cache a LFS blob is named after the SHA-256 the Hub sent when it was downloaded."""
    name = path.resolve().name
    return name if path.is_symlink() and _SHA256_RE.match(name) else None


def verify_file(path: Path, what: str, ref: FileRef | None = None, remote: RemoteFile | None = None,
                *, discard: bool = True) -> None:
    """Check size and hash against the Hub's report and the registry; delete the file and raise if they differ."""
    want_size = remote.size if remote else None
    want_sha = remote.sha256 if remote else None
    want_oid = remote.git_oid if remote and not remote.sha256 else None
    if ref is not None:
        for label, pinned, reported in (("size", ref.size, want_size), ("sha256", ref.sha256, want_sha)):
            if pinned is not None and reported is not None and pinned != reported:
                raise VerificationError(
                    f"{what}: the registry pins {label} {pinned} but the Hub reports {reported} at revision "
                    f"'{ref.revision}'. The file changed upstream: pin 'revision' or update the registry entry.")
        want_size = want_size or ref.size
        want_sha = want_sha or ref.sha256
    if want_sha is None and want_oid is None:
        want_sha = _etag_sha256(path)

    def fail(label: str, expected: Any, got: Any) -> None:
        if discard:
            _discard(path)
        kept = "the bad copy was deleted; run the command again to re-download" if discard else "file kept"
        raise VerificationError(f"{what}: {label} mismatch: expected {expected}, got {got} ({kept}).")

    size = path.stat().st_size
    if want_size is not None and size != want_size:
        fail("size", f"{want_size} bytes", f"{size} bytes")
    if want_sha is None and want_oid is None:
        return
    stamp = _read_stamp(path)
    if stamp and (want_sha is None or stamp.get("sha256") == want_sha) and (
            want_oid is None or stamp.get("git_oid") == want_oid):
        return
    sha, oid = file_digests(path, git=want_oid is not None)
    if want_sha is not None and sha != want_sha:
        fail("sha256", want_sha, sha)
    if want_oid is not None and oid != want_oid:
        fail("git blob id", want_oid, oid)
    _write_stamp(path, sha, oid)


# ---------------------------------------------------------------------------------------------------------
# Finding files on disk (no network)


def find_file(ref: FileRef, settings: Settings) -> Path | None:
    if ref.is_local:
        return Path(ref.path) if Path(ref.path).is_file() else None
    assert ref.repo is not None
    if settings.local_dir is not None:
        path = settings.repo_file(ref.repo, ref.path)
        return path if path.is_file() else None
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(ref.repo, ref.path, cache_dir=settings.cache_dir, revision=ref.revision)
    return Path(hit) if isinstance(hit, str) and Path(hit).is_file() else None


def _repo_manifest(folder: Path) -> Path:
    key = hashlib.sha1(str(folder.resolve()).encode()).hexdigest()
    return paths.cache_dir() / "folders" / f"{key}.json"


def _cache_storage(repo: str, settings: Settings) -> Path:
    """A model repository's folder in the Hugging Face cache (blobs/, refs/, snapshots/)."""
    return settings.cache_dir / ("models--" + repo.replace("/", "--"))


def _snapshot_folder(ref: RepoRef, settings: Settings) -> Path | None:
    assert ref.repo is not None
    if settings.local_dir is not None:
        return settings.repo_dir(ref.repo)
    storage = _cache_storage(ref.repo, settings)
    commit = ref.revision
    if not _GIT_OID_RE.match(commit):
        try:
            commit = (storage / "refs" / ref.revision).read_text().strip()
        except OSError:
            return None
    return storage / "snapshots" / commit


def _folder_complete(folder: Path) -> bool:
    """A folder pid fetched is complete when every file it recorded is there; otherwise judge by its index."""
    if not folder.is_dir():
        return False
    try:
        recorded = json.loads(_repo_manifest(folder).read_text())["files"]
        return all((folder / f).is_file() for f in recorded)
    except (OSError, ValueError, KeyError):
        pass
    if not (folder / "config.json").is_file():
        return False
    indexes = list(folder.glob("*.safetensors.index.json"))
    if not indexes:
        return any(folder.glob("*.safetensors"))
    for index in indexes:
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError):
            return False
        if not all((folder / s).is_file() for s in shards):
            return False
    return True


def find_repo(ref: RepoRef, settings: Settings) -> Path | None:
    if ref.is_local:
        folder = Path(str(ref.path))
        return folder if folder.is_dir() else None
    folder = _snapshot_folder(ref, settings)
    return folder if folder is not None and _folder_complete(folder) else None


# ---------------------------------------------------------------------------------------------------------
# Plans


@dataclass
class PlanItem:
    """One thing to fetch: a file, or a model folder (text encoder, Hugging Face encoders)."""

    role: str  # "decoder", "vae weights", "vae encoder", "text encoder", ...
    ref: FileRef | RepoRef
    entry_ids: list[str] = field(default_factory=list)
    licence: Licence | None = None
    size: int | None = None
    size_exact: bool = False
    on_disk: Path | None = None
    remote: dict[str, RemoteFile] | None = None

    @property
    def key(self) -> tuple[str | None, str | None, str]:
        return (self.ref.repo, self.ref.path, self.ref.revision)

    @property
    def is_repo(self) -> bool:
        return isinstance(self.ref, RepoRef)

    def describe(self) -> str:
        return self.ref.describe()


def _items_for(entry: Entry, vae: bool, text_encoder: bool) -> list[PlanItem]:
    items = [PlanItem("decoder", entry.weights, [entry.id], entry.licence,
                      entry.approx_size, entry.weights.size is not None)]
    if vae and entry.vae is not None:
        items += [PlanItem(f"vae {role}", ref, [entry.id], size=ref.size, size_exact=ref.size is not None)
                  for role, ref in entry.vae.files.items()]
        items += [PlanItem(f"vae {role}", ref, [entry.id]) for role, ref in entry.vae.repos.items()]
    if text_encoder and entry.text_encoder is not None:
        items.append(PlanItem("text encoder", entry.text_encoder, [entry.id]))
    return items


def plan_downloads(entries: Iterable[Entry], *, vae: bool = True, text_encoder: bool = True,
                   settings: Settings | None = None, query_hub: bool = True) -> list[PlanItem]:
    """Exactly the files these entries need (shared files once), what is on disk, and sizes from the Hub."""
    settings = settings or Settings.from_env()
    merged: dict[tuple, PlanItem] = {}
    for entry in entries:
        for item in _items_for(entry, vae, text_encoder):
            if item.key in merged:
                merged[item.key].entry_ids += [i for i in item.entry_ids if i not in merged[item.key].entry_ids]
            else:
                merged[item.key] = item
    items = list(merged.values())
    for item in items:
        item.on_disk = find_repo(item.ref, settings) if item.is_repo else find_file(item.ref, settings)
        if item.ref.is_local and item.on_disk is not None and not item.is_repo:
            item.size, item.size_exact = item.on_disk.stat().st_size, True
    if query_hub and not settings.offline:
        _fill_remote(items, settings)
    return items


def _fill_remote(items: list[PlanItem], settings: Settings) -> None:
    groups: dict[tuple[str, str], list[PlanItem]] = {}
    for item in items:
        if item.ref.is_local:
            continue
        if item.is_repo:
            item.remote = remote_repo_files(item.ref, settings)  # type: ignore[arg-type]
            item.size, item.size_exact = sum(f.size for f in item.remote.values()), True
        else:
            groups.setdefault((str(item.ref.repo), item.ref.revision), []).append(item)
    for (repo, revision), group in groups.items():
        found = remote_files(repo, revision, [str(i.ref.path) for i in group], settings)
        for item in group:
            info = found.get(str(item.ref.path))
            if info is None:
                raise HubError(f"{item.describe()}: not found on the Hub at revision '{revision}'")
            item.remote = {info.path: info}
            item.size, item.size_exact = info.size, True


def plan_total(items: Iterable[PlanItem], missing_only: bool = True) -> tuple[int, bool]:
    """Total bytes (of what is not on disk yet) and whether every size in it is exact."""
    chosen = [i for i in items if not (missing_only and i.on_disk is not None)]
    return sum(i.size or 0 for i in chosen), all(i.size_exact for i in chosen)


# ---------------------------------------------------------------------------------------------------------
# Fetching


def _download_one(repo: str, path: str, revision: str, settings: Settings) -> Path:
    from huggingface_hub import hf_hub_download

    kwargs: dict[str, Any] = {"revision": revision, "endpoint": settings.endpoint, "token": settings.token}
    if settings.local_dir is not None:
        kwargs["local_dir"] = settings.repo_dir(repo)
    else:
        kwargs["cache_dir"] = settings.cache_dir
    return Path(_hub_call(f"{repo}/{path}", settings, lambda: hf_hub_download(repo, path, **kwargs)))


def fetch(item: PlanItem, settings: Settings) -> Path:
    """Make one plan item present and verified; returns the file, or the folder for a repo item."""
    if item.ref.is_local:
        if item.on_disk is None:
            raise MissingFilesError(f"local {item.role} not found: {item.describe()} "
                                    f"(used by {', '.join(item.entry_ids)})", [item.describe()], None)
        if not item.is_repo:
            verify_file(item.on_disk, item.describe(), item.ref, discard=False)  # type: ignore[arg-type]
        return item.on_disk
    if settings.offline:
        if item.on_disk is None:
            raise MissingFilesError(f"{item.describe()} is not on disk and downloading is off (offline mode)",
                                    [item.describe()], None)
        if not item.is_repo:
            verify_file(item.on_disk, item.describe(), item.ref)  # type: ignore[arg-type]
        return item.on_disk
    if item.is_repo:
        return _fetch_repo(item, settings)
    ref: FileRef = item.ref  # type: ignore[assignment]
    assert ref.repo is not None
    return _download_verified(ref.repo, ref.path, ref.revision, settings, item.describe(), ref,
                              (item.remote or {}).get(ref.path), cached=item.on_disk is not None)


def _transfer_resumable(repo: str, path: str, revision: str, settings: Settings, what: str) -> None:
    """Bring a LFS file's bytes to where hf_hub_download adopts them (the cache blob named by its ETag, or the
    file in `--dir`), through a partial file that outlives the process.

    The partial file is named by the file and its ETag (the SHA-256 of the content), so bytes a killed run left
    are continued with an HTTP Range request only for the same file version; partial files of other versions
    are deleted. The finished transfer must hash to the ETag before it is moved into place: a partial file that
    does not (corrupted on disk) is deleted and the file fetched once more from the start. Non-LFS files are
    left to hf_hub_download."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import WeakFileLock, build_hf_headers

    url = hf_hub_url(repo, path, revision=revision, endpoint=settings.endpoint)
    meta = get_hf_file_metadata(url, token=settings.token)
    etag = meta.etag
    if not etag or not _SHA256_RE.match(etag) or not meta.commit_hash:
        return
    headers = build_hf_headers(token=settings.token)
    source = url
    if getattr(meta, "xet_file_data", None) is None and meta.location and meta.location != url:
        source = meta.location  # the exact version the HEAD request saw
        if urlsplit(source).netloc != urlsplit(url).netloc:
            headers.pop("authorization", None)  # a signed CDN address takes no Hub token
    if settings.local_dir is None:
        storage = _cache_storage(repo, settings).expanduser().resolve()
        final, partial_dir = storage / "blobs" / etag, storage / "blobs"
        lock_dir = storage.parent / ".locks" / storage.name
    else:
        final = settings.repo_file(repo, path)
        partial_dir = lock_dir = settings.repo_dir(repo) / ".cache" / "pid"
    key = hashlib.sha1(path.encode()).hexdigest()[:16]
    partial = partial_dir / f"{key}.{etag}.incomplete"
    for folder in (partial_dir, lock_dir):
        folder.mkdir(parents=True, exist_ok=True)
    with WeakFileLock(lock_dir / f"{key}.lock"):
        if final.exists():
            return  # another process finished it while we waited
        for stale in partial_dir.glob(f"{key}.*.incomplete"):
            if stale != partial:
                stale.unlink(missing_ok=True)  # an earlier version of the file
        while True:
            resumed = partial.stat().st_size if partial.exists() else 0
            if meta.size is not None and resumed > meta.size:
                partial.unlink()
                resumed = 0
            if resumed:
                print_notice(f"{what}: continuing the partial download from an earlier run at "
                             f"{format_size(resumed)}")
            try:
                with open(partial, "ab") as fh:
                    http_get(source, fh, resume_size=resumed, headers=headers, expected_size=meta.size,
                             displayed_filename=PurePosixPath(path).name)
            except OSError as exc:
                if "Consistency check failed" in str(exc):
                    partial.unlink(missing_ok=True)
                raise
            sha, _ = file_digests(partial)
            if sha == etag:
                break
            partial.unlink()
            if not resumed:
                raise VerificationError(f"{what}: sha256 mismatch: expected {etag}, got {sha} (the bad copy was "
                                        "deleted; run the command again to re-download).")
            print_notice(f"{what}: the partial download from an earlier run does not hash to the Hub's SHA-256; "
                         "it was deleted, downloading the file again from the start")
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(partial, final)
        _write_stamp(final, sha, None)


def _download_verified(repo: str, path: str, revision: str, settings: Settings, what: str,
                       ref: FileRef | None = None, remote: RemoteFile | None = None, *, cached: bool) -> Path:
    """Download (or find in the cache) and verify one file. A `cached` copy that fails the check (truncated,
    corrupted on disk) is deleted by the check and fetched once more, never loaded; a fresh download that
    fails raises. LFS files not on disk go through `_transfer_resumable`, which continues a partial download
    an earlier run left."""
    check_remote_path(repo, path, revision)
    if not cached and remote is not None and remote.sha256 is not None:
        _hub_call(what, settings, lambda: _transfer_resumable(repo, path, revision, settings, what))
    local = _download_one(repo, path, revision, settings)
    try:
        verify_file(local, what, ref, remote)
    except VerificationError:
        if not cached or local.exists():  # a fresh download, or the registry and the Hub disagree: no retry
            raise
        print_notice(f"{what}: the copy on disk failed its size/hash check and was deleted; downloading it again")
        local = _download_one(repo, path, revision, settings)
        verify_file(local, what, ref, remote)
    return local


def _fetch_repo(item: PlanItem, settings: Settings) -> Path:
    ref: RepoRef = item.ref  # type: ignore[assignment]
    assert ref.repo is not None
    if item.remote is None:
        try:
            item.remote = remote_repo_files(ref, settings)
        except HubError as exc:
            if item.on_disk is not None and _is_connection_error(exc):
                return item.on_disk  # Hub unreachable: use the complete copy we have, as hf_hub_download does
            raise
    folder: Path | None = None
    for rel, info in sorted(item.remote.items()):
        path = _download_verified(ref.repo, rel, ref.revision, settings, f"{ref.repo}/{rel}", remote=info,
                                  cached=item.on_disk is not None)
        folder = folder or path.parents[len(PurePosixPath(rel).parts) - 1]
    assert folder is not None
    manifest = _repo_manifest(folder)
    try:
        manifest.parent.mkdir(parents=True, exist_ok=True)
        manifest.write_text(json.dumps({"repo": ref.repo, "files": sorted(item.remote)}))
    except OSError:
        pass
    return folder


def licence_notice(licence: Licence | None) -> str:
    if licence is None:
        return ""
    return LICENCE_NOTICE.format(name=licence.name, url=f" ({licence.url})" if licence.url else "")


def download_command(entries: Sequence[Entry], *, vae: bool = True, text_encoder: bool = True,
                     local_dir: Path | None = None) -> str:
    """The `pid download` invocation(s) that fetch what these entries need (one per variant name)."""
    from pid_cli.registry import BUILTIN_REGISTRY

    options = [] if vae else ["--no-vae"]
    options += [] if text_encoder else ["--no-text-encoder"]
    options += ["--dir", str(local_dir)] if local_dir is not None else []
    for source in dict.fromkeys(e.source for e in entries):
        if source and Path(source).resolve() != BUILTIN_REGISTRY.resolve():
            options += ["--registry", source]
    by_variant: dict[str, list[str]] = {}
    for entry in entries:
        by_variant.setdefault(entry.variant, []).append(entry.backbone)
    commands = []
    for variant, backbones in by_variant.items():
        parts = ["pid", "download", *[a for b in backbones for a in ("--backbone", b)], "--variant", variant]
        commands.append(" ".join(_quote(p) for p in [*parts, *options]))
    return " && ".join(commands)


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


# ---------------------------------------------------------------------------------------------------------
# What the decode pipeline calls


@dataclass(frozen=True)
class ResolvedFiles:
    """Local paths for one entry. `weights` is the decoder file (a converted safetensors copy when there is
    one); `vae` maps roles (weights, stats, encoder, ...) to files or folders."""

    entry: Entry
    weights: Path | None  # None when the decoder was not asked for
    vae: dict[str, Path]
    text_encoder: Path | None
    converted: bool = False

    @property
    def vae_weights(self) -> Path | None:
        return self.vae.get("weights")


def converted_path(entry: Entry, local_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where `pid convert` puts an entry's safetensors copy by default, and where the loader looks for it."""
    if (problem := entry_id_problem(entry.id)) is not None:  # an Entry built by hand, not by the registry
        raise HubError(f"registry entry {entry.id!r} ({entry.source or 'no registry file'}): {problem}")
    root = Path(local_dir).expanduser() / "converted" if local_dir else paths.cache_dir() / "converted"
    return root / f"{entry.id}.safetensors"


def _converted_is_current(path: Path, entry: Entry, source_sha: str | None, source: Path | None) -> bool:
    """Made by `pid convert` for this entry, from the file the entry points at now (as far as we can tell)."""
    if not path.is_file():
        return False
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
    except Exception:  # a truncated or foreign file is simply not used
        return False
    if meta.get("pid.entry") != entry.id:
        return False
    if source is not None and meta.get("pid.source_size") not in (None, str(source.stat().st_size)):
        return False
    return source_sha is None or meta.get("pid.source_sha256") in (None, source_sha)


def print_notice(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def ensure_files(entry: Entry, *, decoder: bool = True, vae: bool = True, text_encoder: bool = True,
                 local_dir: str | os.PathLike[str] | None = None, offline: bool | None = None,
                 download: bool = True, token: str | None = None, prefer_converted: bool = True,
                 notice: Callable[[str], None] | None = print_notice) -> ResolvedFiles:
    """Everything `entry` needs, on disk and verified; downloads what is missing unless offline.

    Offline (`HF_HUB_OFFLINE=1`, `offline=True` or `download=False`) or with the Hub out of reach, missing files
    raise MissingFilesError naming all of them and the `pid download` command that fetches them. A converted
    safetensors copy of the decoder (`pid convert`) is used instead of the pickle when present and current.
    Without `decoder`, only the VAE and text encoder are resolved (`weights` is None).
    `notice` receives the licence text once if anything is downloaded (default: stderr; None silences it).
    """
    settings = Settings.from_env(local_dir, True if not download else offline, token)
    items = plan_downloads([entry], vae=vae, text_encoder=text_encoder, settings=settings, query_hub=False)
    decoder_item = items[0]
    conv: Path | None = None
    candidate = converted_path(entry, settings.local_dir)
    if not decoder:
        items = items[1:]
    elif prefer_converted and candidate.is_file():
        source_sha = entry.weights.sha256
        if source_sha is None and not settings.offline and not entry.weights.is_local:
            source_sha = _try_remote_sha(entry.weights, settings)
        if _converted_is_current(candidate, entry, source_sha, decoder_item.on_disk):
            conv, items = candidate, items[1:]
    resolved = run_plan(items, settings, notice=notice, command=download_command(
        [entry], vae=vae, text_encoder=text_encoder, local_dir=settings.local_dir))
    by_item = {id(item): path for item, path in resolved}
    vae_paths = {i.role.removeprefix("vae "): by_item[id(i)] for i in items if i.role.startswith("vae ")}
    text = next((by_item[id(i)] for i in items if i.role == "text encoder"), None)
    weights = conv if conv is not None else by_item.get(id(decoder_item))
    return ResolvedFiles(entry, weights, vae_paths, text, converted=conv is not None)


def run_plan(items: Sequence[PlanItem], settings: Settings, *, notice: Callable[[str], None] | None = None,
             command: str | None = None,
             on_done: Callable[[PlanItem, Path], None] | None = None) -> list[tuple[PlanItem, Path]]:
    """Fetch and verify every item. Missing files that cannot be fetched (offline, the Hub out of reach, a local
    file gone) are reported all at once, before anything is downloaded and within seconds; the licence notice
    goes to `notice` once, only if something will be downloaded."""
    missing = [i for i in items if i.on_disk is None]
    out_of_reach = None
    if not settings.offline and any(not i.ref.is_local for i in items):
        out_of_reach = hub_unreachable(settings, next(i.ref for i in items if not i.ref.is_local))
        if out_of_reach is not None:  # no retries against a Hub that is not there: use what is on disk
            settings = Settings(settings.endpoint, settings.cache_dir, settings.local_dir, True, settings.token)
    blocked = [i for i in missing if i.ref.is_local or settings.offline]
    if blocked:
        raise missing_files_error(blocked, settings, command, out_of_reach)
    if out_of_reach is not None and notice is not None:
        notice(f"cannot reach the Hub at {settings.endpoint} ({out_of_reach}): using the verified copies on disk")
    if missing:
        if notice is not None:
            for text in dict.fromkeys(licence_notice(i.licence) for i in items if i.licence is not None):
                notice(text)
        if any(i.remote is None and not i.ref.is_local for i in missing):
            try:
                _fill_remote([i for i in missing if i.remote is None], settings)
            except HubError as exc:
                if not _is_connection_error(exc):
                    raise
    done = []
    for item in items:
        path = fetch(item, settings)
        done.append((item, path))
        if on_done is not None:
            on_done(item, path)
    return done


def missing_files_error(blocked: Sequence[PlanItem], settings: Settings, command: str | None,
                        out_of_reach: str | None = None) -> MissingFilesError:
    """One error naming every file that is missing and cannot be fetched now, and how to get them."""
    hub_blocked = [i for i in blocked if not i.ref.is_local]
    lines = [f"  - {i.describe()} ({i.role}{', ' + format_size(i.size, i.size_exact) if i.size else ''})"
             for i in blocked]
    if not hub_blocked:
        why = "these local files do not exist"
    elif out_of_reach is not None:
        why = f"these files are not on disk and the Hub at {settings.endpoint} cannot be reached ({out_of_reach})"
    else:
        why = "these files are not on disk and downloading is off (HF_HUB_OFFLINE=1 or offline mode)"
    hint = ""
    if command and hub_blocked:
        hint = f"\nFetch them where the Hub can be reached (same HF_HOME or --dir):\n  {command}"
    used_by = ", ".join(dict.fromkeys(e for i in blocked for e in i.entry_ids))
    return MissingFilesError(f"{used_by}: {why}:\n" + "\n".join(lines) + hint,
                             [i.describe() for i in blocked], command if hub_blocked else None)


PROBE_TIMEOUT_S = 10.0  # huggingface_hub's own default for metadata requests


def hub_unreachable(settings: Settings, ref: FileRef | RepoRef | None = None) -> str | None:
    """None if the Hub answers at all (any HTTP status), else why not: one request, no retries, so a machine
    without a route to the Hub finds out in seconds instead of after huggingface_hub's backoff (~25 s a file)."""
    from huggingface_hub.utils import build_hf_headers, get_session

    path = f"/api/models/{ref.repo}/revision/{ref.revision}" if ref is not None and ref.repo else "/api/models"
    try:
        get_session().head(settings.endpoint + path, timeout=PROBE_TIMEOUT_S,
                           headers=build_hf_headers(token=settings.token))
    except Exception as exc:
        if isinstance(exc, (ConnectionError, TimeoutError, OSError)) or type(exc).__module__.startswith(
                ("httpx", "requests", "urllib3", "h11", "ssl")):
            return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise
    return None


def text_encoder_snapshot(entry: Entry | None = None, local_dir: str | os.PathLike[str] | None = None) -> Path:
    """The text-encoder folder already on disk (never downloads); MissingFilesError says how to fetch it."""
    if entry is None:
        from pid_cli.registry import load_registry

        entry = next(e for e in load_registry().entries if e.text_encoder is not None)
    assert entry.text_encoder is not None
    settings = Settings.from_env(local_dir, offline=True)
    item = PlanItem("text encoder", entry.text_encoder, [entry.id])
    item.on_disk = find_repo(entry.text_encoder, settings)
    command = download_command([entry], vae=False, local_dir=settings.local_dir)
    return run_plan([item], settings, command=command)[0][1]


def _try_remote_sha(ref: FileRef, settings: Settings) -> str | None:
    if hub_unreachable(settings, ref) is not None:
        return None
    try:
        info = remote_files(str(ref.repo), ref.revision, [ref.path], settings).get(ref.path)
    except HubError:
        return None
    return info.sha256 if info else None


def entry_status(entry: Entry, settings: Settings | None = None) -> dict[str, Any]:
    """What of an entry is already on disk (no network): for `pid list`."""
    settings = settings or Settings.from_env()
    items = plan_downloads([entry], settings=settings, query_hub=False)
    converted = converted_path(entry, settings.local_dir)
    decoder = converted if converted.is_file() else items[0].on_disk
    return {
        "decoder": str(decoder) if decoder else None,
        "converted": converted.is_file(),
        "vae": all(i.on_disk for i in items if i.role.startswith("vae ")),
        "text_encoder": all(i.on_disk for i in items if i.role == "text encoder"),
        "complete": decoder is not None and all(i.on_disk for i in items[1:]),
    }


def format_size(size: int | None, exact: bool = True) -> str:
    """Decimal units, like the Hub shows them; `≈` marks an estimate."""
    if size is None:
        return "?"
    value, units = float(size), ["B", "KB", "MB", "GB", "TB"]
    while value >= 1000 and len(units) > 1:
        value, units = value / 1000, units[1:]
    text = f"{value:.0f} B" if units[0] == "B" else f"{value:.2f} {units[0]}"
    return text if exact else f"≈{text}"


def list_records(registry: Any, settings: Settings | None = None) -> list[dict[str, Any]]:
    """One JSON-ready record per registry entry, with what is on disk (no network)."""
    settings = settings or Settings.from_env()
    records = []
    for entry in registry.entries:
        weights = entry.weights
        records.append({
            "id": entry.id, "backbone": entry.backbone,
            "aliases": sorted(a for a, b in registry.aliases.items() if b == entry.backbone),
            "variant": entry.variant, "answers_to": list(entry.answers_to), "superseded": entry.superseded,
            "size": entry.approx_size, "size_exact": weights.size is not None,
            "weights": {"path": weights.path} if weights.is_local else
                       {"repo": weights.repo, "path": weights.path, "revision": weights.revision},
            "sr_scale": entry.sr_scale, "latent_channels": entry.latent.channels,
            "vae_factor": entry.latent.vae_factor, "vae_format": entry.vae.format if entry.vae else None,
            "image_inputs": entry.vae is not None and entry.vae.format in IMAGE_ENCODER_KINDS,
            "licence": entry.licence.name if entry.licence else None, "source": entry.source,
            "on_disk": entry_status(entry, settings),
        })
    return records
