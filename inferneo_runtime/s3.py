"""s3:// artifacts, runtime side: the S3 layout, the client, and a verified local cache. boto3 is optional.

Layout of one artifact channel at s3://BUCKET/PREFIX (PREFIX may be empty):

    PREFIX/versions/<hash>/<path>          every file the manifest lists, at its artifact-relative path
    PREFIX/versions/<hash>/inferneo.json   the manifest itself, uploaded after every file it lists
    PREFIX/LATEST                          {"version": <hash>, "manifest_sha256": <hash>, ...}, written last of all

<hash> is the sha256 of the manifest's bytes, and the manifest lists the sha256 of every file, so a version
is immutable and self-verifying: a reader that finds `versions/<hash>/inferneo.json` finds every file it
lists, and a reader that follows LATEST never sees a mix of two builds (a push that dies half-way leaves
LATEST on the previous version; its partial `versions/<new>/` has no manifest and is never read).

`fetch("s3://b/prefix")` resolves LATEST (or takes an explicit `s3://b/prefix/versions/<hash>`), downloads
the version into a hidden temporary directory beside the cache, checks the manifest hashes to <hash> and
every file's size + sha256 against it, and only then renames the directory to
`$INFERNEO_CACHE_DIR/artifacts/<hash>`. A download that dies or fails verification leaves nothing usable
(stale temporary directories are removed by the next fetch); a file lock per <hash> serialises
concurrent fetches of the same version, so the second process waits and then uses the first one's entry.

Endpoint and credentials come from the standard AWS chain: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY,
AWS_PROFILE, ~/.aws/config, instance roles, and AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3 for MinIO or moto.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import uuid
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePath, PurePosixPath
from typing import Callable, Iterator, Optional, Union

from .signing import SIGNATURE_NAME
from .errors import InferneoError, IntegrityError, ManifestError, MissingExtraError, S3Error
from .local_cache import cache_root, file_lock
from .stale import owned_name, remove_stale
from .manifest import MANIFEST_NAME, FileEntry, Manifest, read_manifest, sha256_file, verify_files

LATEST_NAME = "LATEST"
VERSIONS_DIR = "versions"
DEFAULT_JOBS = 8
MULTIPART_THRESHOLD = 64 << 20  # files at least this big go up/down in parts, several at once
MULTIPART_CHUNKSIZE = 64 << 20
_HASH_RE = re.compile(r"^[0-9a-f]{64}$")
_VERSION_KEY_RE = re.compile(r"^(?:(?P<prefix>.*)/)?versions/(?P<version>[0-9a-f]{64})$")


class DestinationExists(InferneoError):
    exit_code = 2


# ---------------------------------------------------------------------------------------------- locations

class NotPublished(S3Error):
    """Nothing is published at the prefix (no LATEST); the build cache treats this as a miss."""


def is_s3_uri(path: object) -> bool:
    """True for "s3://..." and for a Path made from one (pathlib collapses the "//" to "s3:/...")."""
    return isinstance(path, (str, PurePath)) and str(path).startswith("s3:/")


def normalize_uri(path: Union[str, PurePath]) -> str:
    s = str(path)
    return "s3://" + s[4:] if s.startswith("s3:/") and not s.startswith("s3://") else s


@dataclass(frozen=True)
class S3Location:
    """s3://bucket/prefix, optionally pinned to one version (s3://bucket/prefix/versions/<hash>)."""

    bucket: str
    prefix: str  # no leading or trailing slash; may be empty
    version: Optional[str] = None

    def key(self, *parts: str) -> str:
        return "/".join(p.strip("/") for p in (self.prefix, *parts) if p.strip("/"))

    @property
    def latest_key(self) -> str:
        return self.key(LATEST_NAME)

    def version_key(self, version: str, path: str = "") -> str:
        return self.key(VERSIONS_DIR, version, path)

    def manifest_key(self, version: str) -> str:
        return self.version_key(version, MANIFEST_NAME)

    def uri(self, key: Optional[str] = None) -> str:
        key = self.prefix if key is None else key
        return f"s3://{self.bucket}/{key}" if key else f"s3://{self.bucket}"

    def version_uri(self, version: str) -> str:
        return self.uri(self.version_key(version))


def parse_uri(uri: Union[str, PurePath]) -> S3Location:
    s = normalize_uri(uri)
    if not s.startswith("s3://"):
        raise S3Error(f"{s!r} is not an s3:// URI (expected s3://bucket/prefix)")
    bucket, _, key = s[len("s3://"):].partition("/")
    if not bucket:
        raise S3Error(f"{s!r} names no bucket (expected s3://bucket/prefix)")
    key = key.strip("/")
    m = _VERSION_KEY_RE.match(key)
    if m:
        return S3Location(bucket, (m["prefix"] or "").strip("/"), m["version"])
    return S3Location(bucket, key)


def listed_files(manifest: Manifest) -> list[FileEntry]:
    """Every file the manifest lists (root files + all targets), each once, paths checked to stay inside."""
    seen: dict[str, FileEntry] = {}
    for entry in [*manifest.root_files, *(f for t in manifest.targets.values() for f in t.files)]:
        p = PurePosixPath(entry.path)
        if not entry.path or p.is_absolute() or ".." in p.parts or entry.path == MANIFEST_NAME or "\\" in entry.path:
            raise ManifestError(f"manifest lists an unsafe file path {entry.path!r}")
        if entry.path in seen and seen[entry.path] != entry:
            raise ManifestError(f"manifest lists {entry.path!r} twice with different checksums")
        seen[entry.path] = entry
    return list(seen.values())


# ------------------------------------------------------------------------------------------- client, errors

def make_client():
    """An S3 client from the standard AWS chain (env vars, profiles, AWS_ENDPOINT_URL for MinIO/moto)."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise MissingExtraError("s3:// artifacts", "s3", "boto3") from None
    try:
        return boto3.session.Session().client("s3", config=Config(
            retries={"max_attempts": 5, "mode": "standard"}, max_pool_connections=32,
            connect_timeout=10, read_timeout=120))
    except Exception as e:  # ProfileNotFound, bad config files, ...
        raise S3Error(f"cannot configure an S3 client: {e}") from None


def transfer_config(jobs: int = DEFAULT_JOBS, multipart_threshold: int = MULTIPART_THRESHOLD,
                    multipart_chunksize: int = MULTIPART_CHUNKSIZE):
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=multipart_threshold, multipart_chunksize=multipart_chunksize,
                          max_concurrency=max(2, jobs // 2), use_threads=True)


def _error_code(e: Exception) -> tuple[str, Optional[int]]:
    resp = getattr(e, "response", None) or {}
    return str(resp.get("Error", {}).get("Code", "")), resp.get("ResponseMetadata", {}).get("HTTPStatusCode")


def s3_error(e: BaseException, bucket: str, key: Optional[str], action: str) -> BaseException:
    """Translate a boto3/botocore exception into an S3Error naming the bucket/key (others returned as is)."""
    try:
        from botocore import exceptions as bx
    except ImportError:  # pragma: no cover - we only get here through boto3
        return e
    where = f"s3://{bucket}/{key}" if key else f"s3://{bucket}"
    text = str(e)
    if isinstance(e, bx.NoCredentialsError):
        return S3Error(f"no AWS credentials found while {action} {where}: set AWS_ACCESS_KEY_ID and "
                       "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE")
    if isinstance(e, bx.ProfileNotFound):
        return S3Error(f"{e} (while {action} {where})")
    if isinstance(e, (bx.EndpointConnectionError, bx.ConnectTimeoutError)):
        return S3Error(f"cannot reach the S3 endpoint while {action} {where}: {e}")
    code, status = _error_code(e) if isinstance(e, bx.ClientError) else ("", None)
    if not code:  # boto3's transfer errors carry the ClientError only as text
        m = re.search(r"An error occurred \((\w+)\)", text)
        code = m.group(1) if m else ""
    if code == "NoSuchBucket" or (key is None and (code in ("404", "NotFound") or status == 404)):
        return S3Error(f"bucket {bucket!r} does not exist (while {action} {where})")
    if code in ("AccessDenied", "AllAccessDisabled", "403", "Forbidden") or status == 403:
        return S3Error(f"access denied while {action} {where}: check the AWS credentials/profile and the bucket policy")
    if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"):
        return S3Error(f"S3 rejected the credentials ({code}) while {action} {where}")
    if code in ("NoSuchKey", "404", "NotFound") or status == 404:
        return S3Error(f"{where} does not exist")
    if isinstance(e, bx.ParamValidationError):
        return S3Error(f"invalid S3 location {where}: {e}")
    if code or isinstance(e, bx.BotoCoreError) or type(e).__module__.startswith(("boto3", "s3transfer")):
        return S3Error(f"{action} {where} failed: {text}")
    return e


@contextmanager
def s3_errors(bucket: str, key: Optional[str] = None, action: str = "accessing") -> Iterator[None]:
    try:
        yield
    except InferneoError:
        raise
    except Exception as e:
        translated = s3_error(e, bucket, key, action)
        if translated is e:
            raise
        raise translated from None


def is_not_found(e: BaseException) -> bool:
    code, status = _error_code(e)  # type: ignore[arg-type]
    return code in ("NoSuchKey", "404", "NotFound") or status == 404


def head(client, bucket: str, key: str) -> Optional[dict]:
    """HEAD an object (with its stored checksum); None when it does not exist."""
    try:
        return client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
    except Exception as e:
        if is_not_found(e):
            return None
        raise s3_error(e, bucket, key, "checking") from None


def get_bytes(client, bucket: str, key: str, action: str = "reading") -> bytes:
    with s3_errors(bucket, key, action):
        return client.get_object(Bucket=bucket, Key=key)["Body"].read()


def b64_sha256(hex_digest: str) -> str:
    return base64.b64encode(bytes.fromhex(hex_digest)).decode()


def resolve_version(client, loc: S3Location) -> str:
    """The version (manifest sha256) that `loc` names: its pinned version, else what LATEST points at."""
    if loc.version:
        return loc.version
    key = loc.latest_key
    try:
        raw = client.get_object(Bucket=loc.bucket, Key=key)["Body"].read()
    except Exception as e:
        code, _ = _error_code(e)
        if code != "NoSuchBucket" and is_not_found(e):
            raise NotPublished(f"no artifact is published at {loc.uri()}: {loc.uri(key)} does not exist "
                          f"(publish one with `inferneo push ARTIFACT {loc.uri()}`)") from None
        raise s3_error(e, loc.bucket, key, "reading") from None
    try:
        version = json.loads(raw)["version"]
        assert isinstance(version, str) and _HASH_RE.match(version)
    except Exception:
        raise S3Error(f"{loc.uri(key)} is malformed: expected JSON with a 64-hex 'version'") from None
    return version


# ------------------------------------------------------------------------------------------------ progress

class TransferBar:
    """A rich progress bar on stderr with bytes, rate and time left (thread-safe `advance`); a no-op when disabled,
    when stderr is not a terminal, or under INFERNEO_PROGRESS=0 (inferneo_runtime.progress)."""

    def __init__(self, enabled: bool, description: str, total: int):
        from .progress import bars_enabled

        self._progress = self._task = None
        if enabled and bars_enabled():
            from rich.console import Console
            from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                       TransferSpeedColumn)

            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                      TransferSpeedColumn(), TimeRemainingColumn(),
                                      console=Console(stderr=True), transient=False)
            self._task = self._progress.add_task(description, total=total)

    def __enter__(self) -> "TransferBar":
        if self._progress:
            self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._progress:
            self._progress.stop()

    def advance(self, n: int) -> None:
        if self._progress:
            self._progress.update(self._task, advance=n)


def run_parallel(fn: Callable, items: list, jobs: int) -> list:
    """fn(item) for every item on `jobs` threads; on the first failure, cancel the rest and re-raise it."""
    if not items:
        return []
    pool = ThreadPoolExecutor(max_workers=max(1, min(jobs, len(items))))
    try:
        futures = [pool.submit(fn, item) for item in items]
        wait(futures, return_when=FIRST_EXCEPTION)
        for f in futures:
            if f.done() and not f.cancelled() and f.exception() is not None:
                raise f.exception()
        return [f.result() for f in futures]
    finally:  # on failure or Ctrl-C: drop what has not started, let running transfers end, then propagate
        pool.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------------------------------- cache

def artifacts_cache() -> Path:
    return cache_root() / "artifacts"


def _entry_ok(root: Path, version: str) -> bool:
    """Cheap check of a cache entry: the manifest hashes to its version and every listed file has its size.
    (Every load re-checks the sha256 of the files it uses.)"""
    path = root / MANIFEST_NAME
    try:
        if hashlib.sha256(path.read_bytes()).hexdigest() != version:
            return False
        return all((root / e.path).is_file() and (root / e.path).stat().st_size == e.size
                   for e in listed_files(read_manifest(root)))
    except (OSError, InferneoError):
        return False


@dataclass
class Fetched:
    path: Path  # the verified cache entry
    version: str
    uri: str  # s3://bucket/prefix/versions/<version>
    name: str
    files: int
    bytes: int
    downloaded: bool  # False when the cache already held this version


def fetch(uri: Union[str, PurePath], progress: bool = False, jobs: int = DEFAULT_JOBS) -> Path:
    """Download (once) and verify an s3:// artifact; return its local cache directory."""
    return fetch_artifact(uri, progress=progress, jobs=jobs).path


def fetch_artifact(uri: Union[str, PurePath], progress: bool = False, jobs: int = DEFAULT_JOBS) -> Fetched:
    loc = parse_uri(uri)
    client = make_client()
    version = resolve_version(client, loc)
    cache = artifacts_cache()
    final = cache / version

    def result(downloaded: bool) -> Fetched:
        m = read_manifest(final)
        entries = listed_files(m)
        return Fetched(final, version, loc.version_uri(version), m.name, len(entries) + 1,
                       sum(e.size for e in entries) + (final / MANIFEST_NAME).stat().st_size, downloaded)

    if _entry_ok(final, version):
        return result(False)
    with file_lock(cache / f"{version}.lock"):
        if _entry_ok(final, version):  # another process fetched it while we waited
            return result(False)
        for stale in cache.glob(f".{version}.partial-*"):  # left by a fetch that died; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():  # damaged entry: fetch it again
            shutil.rmtree(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{version}.partial-", dir=cache))
        try:
            _download_version(client, loc, version, tmp, progress, jobs)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return result(True)


def drop_entry(entry: Path) -> None:
    """Remove a cache entry whose files fail verification, so that the next fetch downloads it again."""
    with file_lock(entry.parent / f"{entry.name}.lock"):
        shutil.rmtree(entry, ignore_errors=True)


def refresh_signature(uri: Union[str, PurePath], entry: Path) -> bool:
    """Bring a cache entry's signature up to date with S3's; True when it changed.

    A version is the sha256 of its manifest, which the signature is not part of: re-signing an artifact (a new
    key) and pushing it again publishes the same version with another `inferneo.sig`, and a cache entry fetched
    earlier keeps the old one (or none). The signature is verified by whoever loads the entry, not here."""
    loc = parse_uri(uri)
    key = loc.version_key(entry.name, SIGNATURE_NAME)
    try:
        body = make_client().get_object(Bucket=loc.bucket, Key=key)["Body"].read()
    except Exception as e:
        if is_not_found(e):
            return False
        raise s3_error(e, loc.bucket, key, "reading") from None
    sig = entry / SIGNATURE_NAME
    if sig.is_file() and sig.read_bytes() == body:
        return False
    with file_lock(entry.parent / f"{entry.name}.lock"):
        tmp = entry / f".{SIGNATURE_NAME}.{uuid.uuid4().hex[:8]}"
        tmp.write_bytes(body)
        os.replace(tmp, sig)
    return True


def _download_version(client, loc: S3Location, version: str, dest: Path, progress: bool, jobs: int) -> None:
    key = loc.manifest_key(version)
    try:
        raw = client.get_object(Bucket=loc.bucket, Key=key)["Body"].read()
    except Exception as e:
        code, _ = _error_code(e)
        if code != "NoSuchBucket" and is_not_found(e):
            raise S3Error(f"{loc.uri(key)} does not exist: version {version[:12]}… was never completely pushed "
                          f"to {loc.uri()}") from None
        raise s3_error(e, loc.bucket, key, "reading") from None
    digest = hashlib.sha256(raw).hexdigest()
    if digest != version:
        raise IntegrityError(f"{MANIFEST_NAME}: {loc.uri(key)} has sha256 {digest[:12]}…, not its version "
                             f"{version[:12]}…; nothing was cached")
    (dest / MANIFEST_NAME).write_bytes(raw)
    try:  # a signature is optional here; load() decides whether one is required
        (dest / SIGNATURE_NAME).write_bytes(
            client.get_object(Bucket=loc.bucket, Key=loc.version_key(version, SIGNATURE_NAME))["Body"].read())
    except Exception as e:
        if not is_not_found(e):
            raise s3_error(e, loc.bucket, loc.version_key(version, SIGNATURE_NAME), "reading") from None
    entries = listed_files(read_manifest(dest))
    config = transfer_config(jobs)
    total = sum(e.size for e in entries)
    with TransferBar(progress, f"pull {version[:12]}", total) as bar:
        def one(entry: FileEntry) -> None:
            obj = loc.version_key(version, entry.path)
            target = dest / entry.path
            target.parent.mkdir(parents=True, exist_ok=True)
            for attempt in (1, 2):  # a corrupt transfer is fetched once more before we give up
                try:
                    client.download_file(loc.bucket, obj, str(target), Config=config, Callback=bar.advance)
                except Exception as e:
                    if is_not_found(e):
                        raise IntegrityError(f"{entry.path}: listed in the manifest but {loc.uri(obj)} does not "
                                             "exist; nothing was cached") from None
                    raise s3_error(e, loc.bucket, obj, "downloading") from None
                size = target.stat().st_size
                got = sha256_file(target)
                if size == entry.size and got == entry.sha256:
                    return
                bar.advance(-size)
            raise IntegrityError(f"{entry.path}: downloaded from {loc.uri(obj)} with sha256 {got[:12]}… "
                                 f"({size} bytes) but the manifest lists {entry.sha256[:12]}… ({entry.size} "
                                 "bytes); nothing was cached")

        run_parallel(one, entries, jobs)
    verify_files(dest, entries)  # belt and braces: the directory as it will be renamed into place


# ---------------------------------------------------------------------------------------------------- pull

def pull(uri: Union[str, PurePath], dest: Path, force: bool = False, progress: bool = False,
         jobs: int = DEFAULT_JOBS) -> dict:
    """Fetch into the verified cache, then copy the entry to `dest` (verified again, swapped in atomically).

    The copy is independent of the cache (no hard links), so editing `dest` cannot damage the cache.
    """
    t0 = time.perf_counter()
    fetched = fetch_artifact(uri, progress=progress, jobs=jobs)
    if not fetched.downloaded:
        refresh_signature(uri, fetched.path)  # the version may have been re-signed since it was cached
    dest = Path(dest)
    entries = listed_files(read_manifest(fetched.path))
    summary = {"ok": True, "uri": normalize_uri(uri), "version": fetched.version, "version_uri": fetched.uri,
               "name": fetched.name, "dest": str(dest), "cache": str(fetched.path), "files": fetched.files,
               "bytes": fetched.bytes, "downloaded": fetched.downloaded}
    if dest.exists():
        current = dest / MANIFEST_NAME
        same = current.is_file() and sha256_file(current) == fetched.version
        if same:
            try:
                verify_files(dest, entries)
                if _same_signature(fetched.path, dest):
                    return {**summary, "up_to_date": True, "seconds": round(time.perf_counter() - t0, 3)}
                # else the right files without the version's current signature: copied again below
            except IntegrityError as e:
                if not force:
                    raise IntegrityError(f"{dest} holds version {fetched.version[:12]}… but {e}; "
                                         "pass --force to replace it") from None
        elif not dest.is_dir():  # (--force replaces a directory's contents, never a file)
            raise DestinationExists(f"{dest} exists and is not a directory; give the directory to write the "
                                    "artifact to")
        elif any(dest.iterdir()) and not force:
            raise DestinationExists(f"{dest} exists and is not version {fetched.version[:12]}… of this artifact; "
                                    "pass --force to replace it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(dest.parent, f".{dest.name}.pull-")  # left by pulls that were killed
    staging = dest.parent / owned_name(f".{dest.name}.pull-")
    aside = None
    try:
        try:
            _copy_verified(fetched.path, staging, entries)
        except IntegrityError:
            if fetched.downloaded:
                raise
            # a cache entry damaged after it was verified (a flipped byte keeps the size the cheap check sees):
            # download it again, once, as load() does
            shutil.rmtree(staging, ignore_errors=True)
            drop_entry(fetched.path)
            fetched = fetch_artifact(uri, progress=progress, jobs=jobs)
            summary.update(cache=str(fetched.path), downloaded=True)
            _copy_verified(fetched.path, staging, entries)
        if sha256_file(staging / MANIFEST_NAME) != fetched.version:
            raise IntegrityError(f"{staging / MANIFEST_NAME}: copy does not hash to {fetched.version[:12]}…")
        if dest.exists():
            aside = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(dest, aside)
        os.rename(staging, dest)
    except BaseException:
        if aside is not None and not dest.exists():
            os.rename(aside, dest)
            aside = None
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
    return {**summary, "up_to_date": False, "seconds": round(time.perf_counter() - t0, 3)}


def _same_signature(entry: Path, dest: Path) -> bool:
    sig, there = entry / SIGNATURE_NAME, dest / SIGNATURE_NAME
    if not sig.is_file():
        return True  # an unsigned version: whatever signature DEST has is for load() to judge
    return there.is_file() and there.read_bytes() == sig.read_bytes()


def _copy_verified(entry: Path, staging: Path, entries: list[FileEntry]) -> None:
    """Copy a cache entry's listed files, manifest and signature (if any) into `staging`; verify the files."""
    for rel in [e.path for e in entries] + [n for n in (MANIFEST_NAME, SIGNATURE_NAME) if (entry / n).is_file()]:
        (staging / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(entry / rel, staging / rel)
    verify_files(staging, entries)
