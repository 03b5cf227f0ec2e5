"""`inferneo push`: publish an artifact directory to s3://bucket/prefix.

The layout, client and key mapping are the runtime's (`inferneo_runtime.s3`); in short:

    PREFIX/versions/<manifest sha256>/<every listed file>   uploaded first, in parallel, each verified
    PREFIX/versions/<manifest sha256>/inferneo.json         then the manifest
    PREFIX/LATEST                                           then the pointer, last of all

Before uploading, every file is checked against the local manifest (a damaged artifact is never pushed).
Each object is uploaded with an S3-computed SHA256 checksum (`ChecksumAlgorithm="SHA256"`; composite of
part checksums for multipart uploads) and its sha256 in the object metadata; after the upload a HEAD
compares size, metadata and the server's checksum with what we computed locally. An object that already
verifies is not uploaded again, so a re-push of identical content uploads nothing, and a push that died
half-way resumes where it stopped.
"""
from __future__ import annotations

import base64
import hashlib
import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional, Union

from inferneo_runtime import s3
from inferneo_runtime.errors import IntegrityError, S3Error
from inferneo_runtime.signing import SIGNATURE_NAME
from inferneo_runtime.manifest import MANIFEST_NAME, FileEntry, read_manifest


def _digests(path: Path, part_size: Optional[int]) -> tuple[str, Optional[str]]:
    """(sha256 hex of the file, S3 composite SHA256 checksum for `part_size` parts or None), in one read."""
    full, parts = hashlib.sha256(), []
    with open(path, "rb") as f:
        while block := f.read(part_size or (8 << 20)):
            full.update(block)
            if part_size:
                parts.append(hashlib.sha256(block).digest())
    composite = base64.b64encode(hashlib.sha256(b"".join(parts)).digest()).decode() if part_size else None
    return full.hexdigest(), composite


def _verified(head: Optional[dict], sha256: str, size: int, expected: set[str]) -> Optional[str]:
    """How an object matches (sha256 by the server's checksum, or size+metadata without one), or None."""
    if head is None or head.get("ContentLength") != size or head.get("Metadata", {}).get("sha256") != sha256:
        return None
    server = head.get("ChecksumSHA256")
    if server:  # "<b64>" for a single PUT, "<b64>-<parts>" (composite) for a multipart upload
        return "sha256" if server.split("-")[0] in expected else None
    return "size+metadata"  # an S3-compatible server that keeps no checksums


def _head_before_upload(client, bucket: str, key: str) -> Optional[dict]:
    try:
        return client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
    except Exception as e:
        code, status = s3._error_code(e)
        if s3.is_not_found(e) or code in ("403", "AccessDenied") or status == 403:
            return None  # without s3:ListBucket, S3 answers 403 for a missing key
        raise s3.s3_error(e, bucket, key, "checking") from None


class _Pusher:
    def __init__(self, client, loc: s3.S3Location, version: str, root: Path, config, bar: s3.TransferBar):
        self.client, self.loc, self.version, self.root, self.config, self.bar = client, loc, version, root, config, bar

    def file(self, entry: FileEntry) -> tuple[bool, str]:
        """Upload one listed file unless S3 already holds it verified; returns (uploaded, how verified)."""
        from s3transfer.utils import ChunksizeAdjuster

        path = self.root / entry.path
        if not path.is_file():
            raise IntegrityError(f"{path}: listed in the manifest but missing; nothing was published")
        size = path.stat().st_size
        if size != entry.size:
            raise IntegrityError(f"{path}: size {size} does not match the manifest's {entry.size}; nothing was published")
        multipart = size >= self.config.multipart_threshold
        part_size = ChunksizeAdjuster().adjust_chunksize(self.config.multipart_chunksize, size) if multipart else None
        full, composite = _digests(path, part_size)
        if full != entry.sha256:
            raise IntegrityError(f"{path}: sha256 {full[:12]}… does not match the manifest's {entry.sha256[:12]}…; "
                                 "nothing was published")
        expected = {s3.b64_sha256(full)} | ({composite} if composite else set())
        key = self.loc.version_key(self.version, entry.path)
        how = _verified(_head_before_upload(self.client, self.loc.bucket, key), entry.sha256, size, expected)
        if how:
            self.bar.advance(size)
            return False, how
        with s3.s3_errors(self.loc.bucket, key, "uploading"):
            self.client.upload_file(str(path), self.loc.bucket, key, Config=self.config, Callback=self.bar.advance,
                                    ExtraArgs={"Metadata": {"sha256": entry.sha256}, "ChecksumAlgorithm": "SHA256"})
        after = s3.head(self.client, self.loc.bucket, key)
        how = _verified(after, entry.sha256, size, expected)
        if not how:
            got = None if after is None else (after.get("ContentLength"), after.get("ChecksumSHA256"))
            raise IntegrityError(f"{entry.path}: uploaded to {self.loc.uri(key)} but S3 reports (size, checksum) "
                                 f"{got}, expected ({size}, {sorted(expected)}); nothing was published")
        return True, how

    def small(self, key: str, body: bytes, content_type: str = "application/json",
              skip_if_present: bool = True) -> bool:
        """PUT a small object with its SHA256 checksum (S3 rejects a body that does not match); True if uploaded."""
        sha = hashlib.sha256(body).hexdigest()
        expected = {s3.b64_sha256(sha)}
        if skip_if_present and _verified(_head_before_upload(self.client, self.loc.bucket, key), sha, len(body), expected):
            return False
        with s3.s3_errors(self.loc.bucket, key, "uploading"):
            self.client.put_object(Bucket=self.loc.bucket, Key=key, Body=body, ChecksumSHA256=s3.b64_sha256(sha),
                                   Metadata={"sha256": sha}, ContentType=content_type, CacheControl="no-cache")
        if not _verified(s3.head(self.client, self.loc.bucket, key), sha, len(body), expected):
            raise IntegrityError(f"{self.loc.uri(key)}: upload did not verify; nothing was published")
        return True


def push(artifact: Union[str, Path], uri: str, jobs: int = s3.DEFAULT_JOBS, progress: bool = True,
         multipart_threshold: int = s3.MULTIPART_THRESHOLD, multipart_chunksize: int = s3.MULTIPART_CHUNKSIZE) -> dict:
    """Publish `artifact` at `uri` (s3://bucket/prefix); returns a JSON-able summary.

    Files first (parallel; multipart above `multipart_threshold`), then `versions/<hash>/inferneo.json`,
    then `LATEST`. A failure at any point leaves LATEST on the previously published version.
    """
    t0 = time.perf_counter()
    root = Path(artifact)
    manifest = read_manifest(root)
    raw = (root / MANIFEST_NAME).read_bytes()
    version = hashlib.sha256(raw).hexdigest()
    loc = s3.parse_uri(uri)
    if loc.version:
        raise S3Error(f"push takes a prefix (s3://bucket/prefix), not a version: versions are named by the sha256 "
                      f"of their manifest; push to {loc.uri()}")
    entries = s3.listed_files(manifest)
    names = {e.path for e in entries} | {MANIFEST_NAME, SIGNATURE_NAME}
    not_pushed = sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                        if p.is_file() and p.relative_to(root).as_posix() not in names)
    client = s3.make_client()
    try:
        client.head_bucket(Bucket=loc.bucket)
    except Exception as e:
        code, status = s3._error_code(e)
        if not (code in ("403", "AccessDenied") or status == 403):  # may lack s3:ListBucket yet be allowed to PUT
            raise s3.s3_error(e, loc.bucket, None, "checking") from None
    config = s3.transfer_config(jobs, multipart_threshold, multipart_chunksize)
    total = sum(e.size for e in entries)
    with s3.TransferBar(progress, f"push {version[:12]}", total) as bar:
        pusher = _Pusher(client, loc, version, root, config, bar)
        results = s3.run_parallel(pusher.file, entries, jobs)
    # Every listed file is now in S3 and verified: the signature (if any), then the manifest, then the pointer.
    sig = root / SIGNATURE_NAME
    sig_bytes = sig.read_bytes() if sig.is_file() else None
    # the signature may change without the manifest changing (re-signed): uploaded unless S3 holds these bytes
    sig_uploaded = sig_bytes is not None and pusher.small(loc.version_key(version, SIGNATURE_NAME), sig_bytes)
    manifest_uploaded = pusher.small(loc.manifest_key(version), raw)
    latest_key = loc.latest_key
    try:
        current = s3.resolve_version(client, s3.S3Location(loc.bucket, loc.prefix))
    except S3Error:
        current = None  # nothing published yet (or an unreadable pointer we are about to replace)
    latest_updated = current != version
    if latest_updated:
        pointer = {"version": version, "manifest_sha256": version, "name": manifest.name,
                   "files": len(entries) + 1, "bytes": total + len(raw),
                   "pushed_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        pusher.small(latest_key, (json.dumps(pointer, indent=2) + "\n").encode(), skip_if_present=False)
    uploaded = [e for e, (up, _) in zip(entries, results) if up]
    verified: dict[str, int] = {}
    for _, how in results:
        verified[how] = verified.get(how, 0) + 1
    return {
        "ok": True, "uri": loc.uri(), "version": version, "version_uri": loc.version_uri(version),
        "name": manifest.name, "files": len(entries) + 1,
        "uploaded": len(uploaded) + int(manifest_uploaded) + int(sig_uploaded),
        "skipped": len(entries) - len(uploaded) + int(not manifest_uploaded),
        "bytes_uploaded": sum(e.size for e in uploaded) + (len(raw) if manifest_uploaded else 0)
                          + (len(sig_bytes) if sig_uploaded else 0),
        "signature_uploaded": sig_uploaded,
        "latest_updated": latest_updated, "previous_version": current, "verified": verified,
        "not_pushed": not_pushed,  # files in the directory that the manifest does not list (readers ignore them)
        "seconds": round(time.perf_counter() - t0, 3),
    }
