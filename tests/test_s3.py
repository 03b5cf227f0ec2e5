"""s3:// artifacts against a real S3-compatible server (moto, over HTTP in its own process; nothing is mocked
in-process): push → pull → generate, interrupted pushes and downloads, corruption, concurrency, errors."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

pytest.importorskip("boto3")
pytest.importorskip("moto")

from conftest import run_cli  # noqa: E402

PROMPT = "The quick brown fox"




@pytest.fixture
def artifact(tiny_artifact):
    return tiny_artifact("llama")


def version_of(artifact: Path) -> str:
    return hashlib.sha256((artifact / "inferneo.json").read_bytes()).hexdigest()


def variant(artifact: Path, dest: Path, name: str, extra: dict[str, bytes] | None = None) -> Path:
    """A copy of `artifact` whose manifest differs (another name, optional extra root files): a new version."""
    from inferneo_runtime.manifest import file_entry, read_manifest

    shutil.copytree(artifact, dest)
    m = read_manifest(dest)
    added = []
    for rel, data in (extra or {}).items():
        (dest / rel).write_bytes(data)
        added.append(file_entry(dest, dest / rel))
    (dest / "inferneo.json").write_text(m.model_copy(update={"name": name, "root_files": [*m.root_files, *added]}).to_json())
    return dest


def listed(artifact: Path) -> list[str]:
    from inferneo_runtime.manifest import read_manifest
    from inferneo_runtime.s3 import listed_files

    return sorted(e.path for e in listed_files(read_manifest(artifact)))


def latest(client, bucket: str, prefix: str) -> str:
    return json.loads(client.get_object(Bucket=bucket, Key=f"{prefix}/LATEST")["Body"].read())["version"]


def exists(client, bucket: str, key: str) -> bool:
    try:
        client.head_object(Bucket=bucket, Key=key)
        return True
    except client.exceptions.ClientError:
        return False


def do_push(artifact: Path, uri: str, **kw) -> dict:
    from inferneo_build.push import push

    return push(artifact, uri, progress=False, **kw)


def cache_entries() -> list[str]:
    root = Path(os.environ["INFERNEO_CACHE_DIR"]) / "artifacts"
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def greedy(path, n: int = 8) -> list[int]:
    import inferneo_runtime

    with inferneo_runtime.load(path, target="onnx") as model:
        return model.generate(PROMPT, max_new_tokens=n).token_ids


# A subprocess that runs `body` after making the Nth S3 call of one kind kill the process on the spot (os._exit:
# no cleanup, no finally blocks), through a botocore event hook on every client inferneo creates.
DIE_AFTER = """
import os, sys, threading
import inferneo_runtime.s3 as s3m
_make, _lock, _count = s3m.make_client, threading.Lock(), [0]
def _hook(**kw):
    with _lock:
        _count[0] += 1
        if _count[0] > {n}:
            os._exit(17)
def make_client():
    c = _make()
    c.meta.events.register("before-send.s3.{op}", _hook)
    return c
s3m.make_client = make_client
"""


def run_dying(op: str, n: int, body: str) -> subprocess.CompletedProcess:
    script = DIE_AFTER.format(op=op, n=n) + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)


# ------------------------------------------------------------------------------------------------------ tests

def test_push_pull_generate_round_trip(s3env, client, bucket, artifact, tmp_path):
    uri = f"s3://{bucket}/models/tiny"
    version = version_of(artifact)
    files = listed(artifact)

    r = run_cli("push", str(artifact), uri, "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    pushed = json.loads(r.stdout)
    assert pushed["version"] == version and pushed["latest_updated"] and pushed["previous_version"] is None
    assert pushed["uploaded"] == pushed["files"] == len(files) + 1 and pushed["skipped"] == 0
    assert pushed["verified"] == {"sha256": len(files)}  # every file matched S3's own SHA256 checksum
    assert latest(client, bucket, "models/tiny") == version
    for rel in files + ["inferneo.json"]:
        obj = client.get_object(Bucket=bucket, Key=f"models/tiny/versions/{version}/{rel}")["Body"].read()
        assert obj == (artifact / rel).read_bytes(), rel

    dest = tmp_path / "pulled"
    r = run_cli("pull", uri, str(dest), "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    pulled = json.loads(r.stdout)
    assert pulled["version"] == version and pulled["downloaded"] and not pulled["up_to_date"]
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()) == sorted(files + ["inferneo.json"])
    for rel in files + ["inferneo.json"]:
        assert (dest / rel).read_bytes() == (artifact / rel).read_bytes(), rel
    assert cache_entries() == [version]

    # generate from the pulled copy and straight from the URI (the CLI's Path argument turns s3:// into s3:/)
    expected = greedy(artifact)
    assert greedy(dest) == expected
    assert greedy(uri) == expected
    r = run_cli("generate", uri, PROMPT, "--max-new-tokens", "8", "--target", "onnx", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(r.stdout)["token_ids"] == expected

    # a re-push of identical content uploads nothing, and says so
    r = run_cli("push", str(artifact), uri, "--json")
    again = json.loads(r.stdout)
    assert r.returncode == 0 and again["uploaded"] == 0 and again["bytes_uploaded"] == 0
    assert not again["latest_updated"] and again["skipped"] == again["files"]
    r = run_cli("push", str(artifact), uri)
    assert r.returncode == 0 and "nothing to upload" in r.stdout, r.stdout + r.stderr

    # pulling again is a no-op; an unrelated non-empty destination is refused without --force
    r = run_cli("pull", uri, str(dest), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["up_to_date"]
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    r = run_cli("pull", uri, str(other), "--json")
    assert r.returncode == 2 and "--force" in json.loads(r.stdout)["message"]
    assert (other / "keep.txt").read_text() == "mine"
    r = run_cli("pull", uri, str(other), "--force", "--json")
    assert r.returncode == 0 and not (other / "keep.txt").exists() and (other / "inferneo.json").is_file()

    # an explicit version URI resolves without LATEST
    from inferneo_runtime.s3 import fetch

    assert fetch(f"{uri}/versions/{version}").name == version


def test_multipart_upload_is_verified_and_resumable(s3env, client, bucket, artifact, tmp_path):
    blob = os.urandom(11 << 20)  # three 5 MiB parts (S3's minimum part size)
    art = variant(artifact, tmp_path / "big", "tiny-big", {"blob.bin": blob})
    uri = f"s3://{bucket}/big"
    kw = dict(multipart_threshold=5 << 20, multipart_chunksize=5 << 20)
    first = do_push(art, uri, **kw)
    assert first["uploaded"] == first["files"] and first["verified"]["sha256"] == len(listed(art))
    head = client.head_object(Bucket=bucket, Key=f"big/versions/{first['version']}/blob.bin", ChecksumMode="ENABLED")
    assert head["Metadata"]["sha256"] == hashlib.sha256(blob).hexdigest()
    assert do_push(art, uri, **kw)["uploaded"] == 0  # the composite checksum matches: nothing re-sent
    from inferneo_runtime.s3 import fetch

    assert (fetch(uri) / "blob.bin").read_bytes() == blob


def test_push_that_dies_half_way_leaves_previous_version_published(s3env, client, bucket, artifact, tmp_path):
    uri = f"s3://{bucket}/models/tiny"
    v1 = do_push(artifact, uri)["version"]
    new = variant(artifact, tmp_path / "v2", "tiny-llama-v2")
    v2 = version_of(new)
    n_files = len(listed(new))
    assert n_files > 4

    r = run_dying("PutObject", 3, f"""
        import sys
        from inferneo_runtime.cli import main
        sys.argv = ["inferneo", "push", {str(new)!r}, {uri!r}, "--jobs", "1", "--json"]
        main()
    """)
    assert r.returncode == 17, r.stdout + r.stderr  # killed mid-push
    done = [k["Key"] for k in client.list_objects_v2(Bucket=bucket, Prefix=f"models/tiny/versions/{v2}/").get("Contents", [])]
    assert 0 < len(done) < n_files  # some files of the new version went up ...
    assert not exists(client, bucket, f"models/tiny/versions/{v2}/inferneo.json")  # ... but never its manifest
    assert latest(client, bucket, "models/tiny") == v1

    import inferneo_runtime

    with inferneo_runtime.load(uri) as model:  # readers still get the old version, whole
        assert model.name == "tiny-llama" and len(model.generate(PROMPT, max_new_tokens=4).token_ids) >= 1
    assert cache_entries() == [v1]

    resumed = do_push(new, uri)  # a second push sends only what is missing, then flips LATEST
    assert resumed["uploaded"] == n_files + 1 - len(done) and resumed["previous_version"] == v1
    assert latest(client, bucket, "models/tiny") == v2
    with inferneo_runtime.load(uri) as model:
        assert model.name == "tiny-llama-v2"


def test_download_that_dies_half_way_leaves_no_cache_entry(s3env, client, bucket, artifact):
    uri = f"s3://{bucket}/tiny"
    version = do_push(artifact, uri)["version"]
    # GETs: LATEST, the manifest, then files; die after a few files have landed
    r = run_dying("GetObject", 4, f"""
        import inferneo_runtime
        inferneo_runtime.load({uri!r})
    """)
    assert r.returncode == 17, r.stdout + r.stderr
    cache = Path(os.environ["INFERNEO_CACHE_DIR"]) / "artifacts"
    assert not (cache / version).exists()
    assert list(cache.glob(f".{version}.partial-*"))  # the half-download is there, under a name nobody loads

    expected = greedy(artifact)
    assert greedy(uri) == expected  # the next load fetches again, verifies, and cleans up
    assert cache_entries() == [version] and not list(cache.glob(".*partial*"))


def test_flipped_byte_in_s3_is_reported_and_nothing_is_cached(s3env, client, bucket, artifact, tmp_path):
    import inferneo_runtime
    from inferneo_runtime.manifest import read_manifest

    uri = f"s3://{bucket}/tiny"
    version = do_push(artifact, uri)["version"]
    victim = read_manifest(artifact).targets["onnx"].files[0].path
    key = f"tiny/versions/{version}/{victim}"
    data = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    data[len(data) // 2] ^= 0x01
    client.put_object(Bucket=bucket, Key=key, Body=bytes(data))

    with pytest.raises(inferneo_runtime.IntegrityError, match=victim):
        inferneo_runtime.load(uri)
    cache = Path(os.environ["INFERNEO_CACHE_DIR"]) / "artifacts"
    assert cache_entries() == [] and not list(cache.glob(".*partial*"))

    dest = tmp_path / "pulled"
    r = run_cli("pull", uri, str(dest), "--json")
    assert r.returncode == 4, r.stdout + r.stderr
    assert victim in json.loads(r.stdout)["message"] and not dest.exists()

    # a manifest that does not hash to its version is refused too
    client.put_object(Bucket=bucket, Key=f"tiny/versions/{version}/inferneo.json",
                      Body=(artifact / "inferneo.json").read_bytes() + b" ")
    with pytest.raises(inferneo_runtime.IntegrityError, match="inferneo.json"):
        inferneo_runtime.load(uri)
    assert cache_entries() == []


def test_two_processes_load_the_same_uri_at_once(s3env, bucket, artifact, tmp_path):
    uri = f"s3://{bucket}/tiny"
    version = do_push(artifact, uri)["version"]
    go = tmp_path / "go"
    script = textwrap.dedent(f"""
        import json, os, time, inferneo_runtime
        from inferneo_runtime.s3 import fetch_artifact
        print("ready", flush=True)
        while not os.path.exists({str(go)!r}):  # start both fetches at the same moment
            time.sleep(0.005)
        fetched = fetch_artifact({uri!r})
        with inferneo_runtime.load({uri!r}, target="onnx") as m:
            print(json.dumps({{"root": str(m.root), "downloaded": fetched.downloaded,
                              "tokens": m.generate({PROMPT!r}, max_new_tokens=8).token_ids}}))
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for p in procs:
        assert p.stdout.readline().strip() == "ready", p.communicate()[1]
    go.touch()
    outs = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 0, stderr
        outs.append(json.loads(stdout.strip().splitlines()[-1]))
    assert sorted(o["downloaded"] for o in outs) == [False, True]  # one downloaded; the other waited, then reused it
    assert outs[0]["tokens"] == outs[1]["tokens"] == greedy(artifact)
    cache = Path(os.environ["INFERNEO_CACHE_DIR"]) / "artifacts"
    assert Path(outs[0]["root"]) == Path(outs[1]["root"]) == cache / version
    assert cache_entries() == [version] and not list(cache.glob(".*partial*"))


def test_errors_name_the_bucket_and_key(s3env, bucket, artifact, tmp_path):
    dest = str(tmp_path / "out")
    missing = f"no-such-bucket-{uuid.uuid4().hex[:8]}"

    r = run_cli("pull", f"s3://{missing}/models/x", dest, "--json")
    err = json.loads(r.stdout)
    assert r.returncode == 8 and err["error"] == "S3Error", r.stdout + r.stderr
    assert missing in err["message"] and "does not exist" in err["message"]

    r = run_cli("pull", f"s3://{bucket}/nothing/here", dest)  # human output on stderr
    assert r.returncode == 8
    assert f"s3://{bucket}/nothing/here/LATEST" in r.stderr and "inferneo push" in r.stderr

    r = run_cli("pull", f"s3://{bucket}/nothing/versions/{'0' * 64}", dest, "--json")
    assert r.returncode == 8 and f"s3://{bucket}/nothing/versions/{'0' * 64}/inferneo.json" in json.loads(r.stdout)["message"]

    r = run_cli("push", str(artifact), f"s3://{missing}/p", "--json")
    assert r.returncode == 8 and missing in json.loads(r.stdout)["message"]

    r = run_cli("generate", f"s3://{bucket}/nothing", PROMPT, "--json")
    assert r.returncode == 8 and "LATEST" in json.loads(r.stdout)["message"]
    assert not Path(dest).exists()


def test_without_boto3_s3_names_the_extra(artifact):
    script = textwrap.dedent("""
        import json, sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("boto3", "botocore", "s3transfer"):
                    raise ImportError(f"{name} is blocked in this test")
        sys.meta_path.insert(0, Block())
        import inferneo_runtime, inferneo_runtime.cli
        try:
            inferneo_runtime.load("s3://bucket/prefix")
            print(json.dumps({"error": None}))
        except inferneo_runtime.MissingExtraError as e:
            print(json.dumps({"error": str(e), "code": e.exit_code}))
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert "inferneo[s3]" in out["error"] and "boto3" in out["error"] and out["code"] == 5
    r = subprocess.run([sys.executable, "-c", "import sys, inferneo_runtime, inferneo_runtime.cli; "
                        "print([m for m in ('boto3', 'botocore') if m in sys.modules])"],
                       capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "[]", r.stdout + r.stderr


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_cache_entry_damaged_in_place_is_downloaded_again(s3env, bucket, artifact):
    """A same-size flipped byte passes the cache's cheap size check; load's checksum catches it, and the entry is
    fetched again instead of failing on every load from then on."""
    import inferneo_runtime
    from inferneo_runtime.s3 import artifacts_cache

    uri = f"s3://{bucket}/damaged"
    version = do_push(artifact, uri)["version"]
    expected = greedy(uri)
    entry = artifacts_cache() / version
    data = next(p for p in (entry / "onnx").iterdir() if p.suffix == ".data")
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with inferneo_runtime.load(uri, target="onnx") as model:
        assert model.generate(PROMPT, max_new_tokens=8).token_ids == expected
    assert hashlib.sha256(data.read_bytes()).hexdigest() == hashlib.sha256(
        (artifact / data.relative_to(entry)).read_bytes()).hexdigest()


def test_a_killed_pulls_staging_is_removed_by_the_next_pull(s3env, bucket, artifact, tmp_path):
    from inferneo_runtime.stale import owned_name

    uri = f"s3://{bucket}/stale"
    do_push(artifact, uri)
    pulls = tmp_path / "pulls"
    dest = pulls / "out"
    dead = pulls / owned_name(".out.pull-").replace(f".{os.getpid()}.", f".{_dead_pid()}.")
    alive = pulls / owned_name(".out.pull-").replace(f".{os.getpid()}.", f".{os.getppid()}.")
    for d in (dead, alive):
        (d / "onnx").mkdir(parents=True)
        (d / "onnx" / "model.onnx.data").write_bytes(b"x" * 1024)
    r = run_cli("pull", uri, str(dest), "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    assert not dead.exists() and alive.exists()  # a running process's staging is left alone
    assert sorted(p.name for p in pulls.iterdir()) == sorted(["out", alive.name])


def _signed_copy(artifact: Path, dest: Path, key_dir: Path, name: str) -> tuple[Path, str]:
    """A copy of `artifact` signed with a new key; returns (the copy, the key's public file)."""
    from inferneo_runtime.signing import generate_keypair, sign_artifact

    if not dest.exists():
        shutil.copytree(artifact, dest)
    private, public, _ = generate_keypair(key_dir / name)
    sign_artifact(dest, private)
    return dest, str(public)


def test_a_pulled_signed_artifact_keeps_its_signature(s3env, bucket, artifact, tmp_path):
    """`inferneo pull` of a signed artifact writes its inferneo.sig too, so the copy loads where signatures are
    required (and a copy pulled without it is completed by the next pull, not called up to date)."""
    signed, public = _signed_copy(artifact, tmp_path / "signed", tmp_path, "ci")
    uri = f"s3://{bucket}/signed"
    do_push(signed, uri)
    dest = tmp_path / "pulled"
    r = run_cli("pull", uri, str(dest), "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    assert (dest / "inferneo.sig").read_bytes() == (signed / "inferneo.sig").read_bytes()
    r = run_cli("generate", str(dest), PROMPT, "--max-new-tokens", "4", "--trusted-key", public, "--json")
    assert r.returncode == 0, r.stdout + r.stderr

    (dest / "inferneo.sig").unlink()  # as an earlier pull left it
    r = run_cli("pull", uri, str(dest), "--json")
    assert r.returncode == 0 and not json.loads(r.stdout)["up_to_date"], r.stdout + r.stderr
    assert (dest / "inferneo.sig").read_bytes() == (signed / "inferneo.sig").read_bytes()


def test_a_re_signed_version_is_trusted_from_a_warm_cache(s3env, bucket, artifact, tmp_path):
    """Re-signing (a new key) leaves the manifest, hence the version and its cache entry, unchanged: a load or pull
    that requires the new key reads the signature S3 now holds instead of refusing the cached old one."""
    import inferneo_runtime

    signed, old = _signed_copy(artifact, tmp_path / "signed", tmp_path, "old")
    uri = f"s3://{bucket}/rotated"
    version = do_push(signed, uri)["version"]
    with inferneo_runtime.load(uri, target="onnx", trusted_keys=[old]) as model:  # cached, with the old signature
        expected = model.generate(PROMPT, max_new_tokens=4).token_ids
    _, new = _signed_copy(artifact, signed, tmp_path, "new")
    assert do_push(signed, uri)["version"] == version
    with inferneo_runtime.load(uri, target="onnx", trusted_keys=[new]) as model:
        assert model.generate(PROMPT, max_new_tokens=4).token_ids == expected
    dest = tmp_path / "pulled"
    r = run_cli("pull", uri, str(dest), "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    r = run_cli("generate", str(dest), PROMPT, "--max-new-tokens", "4", "--trusted-key", new, "--json")
    assert r.returncode == 0, r.stdout + r.stderr


def test_pull_downloads_a_cache_entry_damaged_in_place_again(s3env, bucket, artifact, tmp_path):
    """Like load, pull does not fail forever on a cache entry whose bytes changed after it was verified."""
    from inferneo_runtime.s3 import artifacts_cache

    uri = f"s3://{bucket}/damaged-pull"
    version = do_push(artifact, uri)["version"]
    first = tmp_path / "first"
    assert run_cli("pull", uri, str(first)).returncode == 0
    data = next(p for p in (artifacts_cache() / version / "onnx").iterdir() if p.suffix == ".data")
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    dest = tmp_path / "second"
    r = run_cli("pull", uri, str(dest), "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(r.stdout)["downloaded"]
    assert greedy(dest) == greedy(artifact)


def test_re_signing_and_pushing_says_the_signature_was_uploaded(s3env, client, bucket, artifact, tmp_path):
    """A push whose only change is a new signature uploads it and says so (not "nothing to upload"); pushing the
    same signed artifact again uploads nothing."""
    signed, _ = _signed_copy(artifact, tmp_path / "signed", tmp_path, "old")
    uri = f"s3://{bucket}/resigned"
    version = do_push(signed, uri)["version"]
    again = do_push(signed, uri)
    assert again["uploaded"] == 0 and again["bytes_uploaded"] == 0
    _signed_copy(artifact, signed, tmp_path, "new")
    r = run_cli("push", str(signed), uri)
    assert r.returncode == 0 and "nothing to upload" not in r.stdout, r.stdout + r.stderr
    r = run_cli("push", str(signed), uri, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["uploaded"] == 0, r.stdout + r.stderr
    key = f"resigned/versions/{version}/inferneo.sig"
    assert client.get_object(Bucket=bucket, Key=key)["Body"].read() == (signed / "inferneo.sig").read_bytes()


def test_pull_onto_a_file_says_what_is_wrong(s3env, bucket, artifact, tmp_path):
    uri = f"s3://{bucket}/onto-file"
    do_push(artifact, uri)
    dest = tmp_path / "notes.txt"
    dest.write_text("mine")
    for extra in ((), ("--force",)):
        r = run_cli("pull", uri, str(dest), *extra, "--json")
        message = json.loads(r.stdout)["message"]
        assert r.returncode == 2 and "not a directory" in message and "pass --force" not in message, r.stdout
        assert dest.read_text() == "mine"
