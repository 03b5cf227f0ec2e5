"""Many builds at once: `inferneo build recipes/` (every recipe in a directory), optionally as Ray tasks.

- Sequential (default): each recipe is built in turn, exactly as `inferneo build RECIPE` would.
- `--ray`: each recipe becomes a Ray task, and a recipe with several targets becomes one task per target
  (a sub-build of that target alone, validated against the same reference); the driver then merges the
  targets into the recipe's artifact, as one atomic publish, with the build key a whole build would have.
  Tasks run on a local Ray cluster or on RAY_ADDRESS's; TensorRT targets ask Ray for a GPU.
- With the S3 build cache (`--cache s3://...`), no two jobs compile the same thing: a build first checks the
  output and the cache, then takes a lock object `<cache>/locks/<build key>` with a conditional PUT
  (If-None-Match: *). Another CI job or task needing the same key waits for the holder to store its result
  and then pulls it from the cache. A lock older than `stale_after_s` (its holder died) is taken over.

Outputs: each recipe's own `output` (default artifacts/<name>); with `--output DIR`, DIR/<name>.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Optional

from inferneo_runtime.errors import InferneoError, MissingExtraError
from inferneo_runtime.charts import VALIDATION_CHART_NAME
from inferneo_runtime.manifest import (MANIFEST_NAME, VALIDATION_NAME, TargetEntry, file_entry,
                                       read_manifest)

from .recipe import Recipe, RecipeError, load_recipe

RECIPE_SUFFIXES = (".yaml", ".yml")
LOCK_POLL_S = 2.0
STALE_AFTER_S = 3 * 3600.0
WORK_DIR = ".inferneo-fanout"  # per-target sub-builds, beside the outputs
FORWARDED_ENV = ("AWS_", "INFERNEO_", "HF_", "TRANSFORMERS_")


class FanoutError(InferneoError):
    exit_code = 2


def find_recipes(directory: Path) -> list[Path]:
    """The recipe files directly in `directory`, sorted by name."""
    found = sorted(p for p in Path(directory).iterdir() if p.is_file() and p.suffix in RECIPE_SUFFIXES)
    if not found:
        raise FanoutError(f"{directory}: no recipe files (*.yaml, *.yml)")
    return found


def _quiet_libraries() -> None:
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:
        pass


def build_key_of(recipe: Recipe) -> str:
    """The key build() computes for `recipe` (resolving its source, which is cached), by the same function, so
    a fan-out checks and locks exactly what build() will look up."""
    from .build import resolve_and_key

    return resolve_and_key(recipe)[2]


# -- the S3 build lock ----------------------------------------------------------------------------------
@contextmanager
def build_lock(cache: Optional[str], key: str, log=lambda _: None, stale_after_s: float = STALE_AFTER_S,
               poll_s: float = LOCK_POLL_S) -> Iterator[bool]:
    """Hold `<cache>/locks/<key>` while compiling; yields True if this process waited for another holder
    (whose result is then in the cache). Without a cache there is nothing to share: no lock."""
    if not cache:
        yield False
        return
    from inferneo_runtime import s3

    loc = s3.parse_uri(cache)
    client = s3.make_client()
    lock_key = loc.key("locks", key)
    done_key = loc.key(key, s3.LATEST_NAME)  # what build_cache.store writes last
    body = json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                       "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}).encode()
    waited = False
    while True:
        if s3.head(client, loc.bucket, done_key) is not None:
            yield waited  # built meanwhile (or earlier): build() pulls it from the cache
            return
        try:
            client.put_object(Bucket=loc.bucket, Key=lock_key, Body=body, IfNoneMatch="*")
            break
        except Exception as e:  # noqa: BLE001 - sorted below
            code = getattr(e, "response", {}).get("Error", {}).get("Code")
            if code not in ("PreconditionFailed", "ConditionalRequestConflict"):
                raise s3.s3_error(e, loc.bucket, lock_key, "locking") from None
        held = s3.head(client, loc.bucket, lock_key)
        if held is not None and time.time() - held["LastModified"].timestamp() > stale_after_s:
            log(f"build lock {loc.uri(lock_key)} is stale; taking it over")
            client.delete_object(Bucket=loc.bucket, Key=lock_key)
            continue
        if not waited:
            log(f"another job is building {key[:12]}; waiting for it ({loc.uri(lock_key)})")
        waited = True
        time.sleep(poll_s)
    try:
        yield waited
    finally:
        try:
            client.delete_object(Bucket=loc.bucket, Key=lock_key)
        except Exception:  # noqa: BLE001 - a lock left behind goes stale; never hide the build's own error
            pass


# -- one recipe, one process ------------------------------------------------------------------------------
def _targets(manifest) -> dict:
    return {name: {"status": t.status, "validation": t.validation.model_dump(mode="json")}
            for name, t in manifest.targets.items()}


def _summary(result, recipe: Recipe, path: Optional[Path] = None) -> dict:
    return {"ok": True, "recipe": str(path) if path else None, "output": str(result.output),
            "name": result.manifest.name, "seconds": round(result.seconds, 2), "cached": result.cached,
            "build_key": result.manifest.build_key, "targets": _targets(result.manifest)}


def build_locked(recipe: Recipe, output: Path, *, quiet: bool = True, force: bool = False,
                 cache: Optional[str] = None, sign_key: Optional[Path] = None, path: Optional[Path] = None) -> dict:
    """build() under the S3 build lock (when a cache is given): what `inferneo build` does per recipe."""
    from .build import Progress, build

    _quiet_libraries()
    progress = Progress(quiet=quiet)
    if cache and not force:
        with build_lock(cache, build_key_of(recipe), progress.log):
            result = build(recipe, output, progress, force=force, cache=cache, sign_key=sign_key)
    else:
        result = build(recipe, output, progress, force=force, cache=cache, sign_key=sign_key)
    return _summary(result, recipe, path)


def _output_for(recipe: Recipe, output_root: Optional[Path]) -> Path:
    return (Path(output_root) / recipe.name if output_root else recipe.output_dir).absolute()


def _failure(e: BaseException, path: Path) -> dict:
    return {"ok": False, "recipe": str(path), "error": type(e).__name__, "message": str(e) or type(e).__name__,
            "exit_code": getattr(e, "exit_code", 1)}


# -- Ray tasks --------------------------------------------------------------------------------------------
@dataclass
class _Job:
    path: Path
    recipe: Recipe
    output: Path
    target: Optional[str] = None  # a target name: a per-target sub-build


def _task(recipe_json: str, output: str, cwd: str, cache: Optional[str], force: bool, target: Optional[str],
          optional: bool) -> dict:
    """A Ray task: build one recipe (or one target's sub-recipe) on whatever node Ray picked."""
    import ray

    os.chdir(cwd)  # recipes resolve relative paths against the working directory
    recipe = Recipe.model_validate_json(recipe_json)
    node = ray.get_runtime_context().get_node_id()
    try:
        summary = build_locked(recipe, Path(output), force=force, cache=cache)
    except Exception as e:
        from .exporters import TargetUnavailable

        if target is not None and optional and (isinstance(e, TargetUnavailable) or "all were skipped" in str(e)):
            return {"ok": True, "skipped": str(e), "target": target, "node": node}
        raise
    return summary | {"node": node, "target": target}


def _ray(address: Optional[str]):
    try:
        import ray
    except ImportError:
        raise MissingExtraError("`inferneo build --ray`", "ray", "ray") from None
    if not ray.is_initialized():
        # Tasks run in workers the cluster started, which do not see this process's environment: hand them
        # the settings a build reads (S3 endpoint and credentials, Inferneo's and Hugging Face's caches).
        env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV) and k != "RAY_ADDRESS"}
        options = {"logging_level": "WARNING", "log_to_driver": False, "runtime_env": {"env_vars": env}}
        if not (address or os.environ.get("RAY_ADDRESS")):
            options["include_dashboard"] = False
        ray.init(address=address, **options)
    return ray


def _sub_recipe(recipe: Recipe, target) -> Recipe:
    return recipe.model_copy(update={"targets": [target]})


def _merge(recipe: Recipe, key: str, parts: list[tuple[str, object]], output: Path, cache: Optional[str],
           sign_key: Optional[Path]) -> dict:
    """One artifact from per-target sub-builds: root files and goldens from the first, every target's folder,
    validation.json's per-target reports concatenated, the recipe's build key; published atomically."""
    from .build_cache import store
    from .pipeline import BuildError, skipped_target, validation_chart
    from .publish import staged

    t0 = time.perf_counter()
    built = [(name, Path(p)) for name, p in parts if not isinstance(p, str)]
    if not built:
        raise BuildError("no target was built (all were skipped)")
    manifests = {name: read_manifest(p) for name, p in built}
    first_name, first_dir = built[0]
    base = manifests[first_name]
    for name, m in manifests.items():
        for field in ("model", "source", "generation", "goldens", "task", "architecture"):
            if getattr(m, field) != getattr(base, field):
                raise BuildError(f"target {name}: its sub-build's {field} differs from {first_name}'s; "
                                 f"build {recipe.name} without --ray")
    with staged(output) as staging:
        for f in base.root_files:
            if f.path not in (VALIDATION_NAME, VALIDATION_CHART_NAME):  # both redone for every target below
                (staging / f.path).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(first_dir / f.path, staging / f.path)
        first_report = first_dir / VALIDATION_NAME
        report = json.loads(first_report.read_text()) if first_report.is_file() else {}
        report_targets: list = []
        targets: dict[str, TargetEntry] = {}
        for name, part in parts:
            if isinstance(part, str):  # an optional target that could not be built here
                fmt = next(t.format for t in recipe.targets if recipe.target_name(t) == name)
                targets[name] = skipped_target(fmt, part)
                continue
            part = Path(part)
            shutil.copytree(part / name, staging / name)
            targets[name] = manifests[name].targets[name]
            if (part / VALIDATION_NAME).is_file():
                report_targets += json.loads((part / VALIDATION_NAME).read_text()).get("targets", [])
        root_files = [f for f in base.root_files if f.path not in (VALIDATION_NAME, VALIDATION_CHART_NAME)]
        if report:
            report["targets"] = report_targets
            (staging / VALIDATION_NAME).write_text(json.dumps(report, indent=2) + "\n")
            root_files.append(file_entry(staging, staging / VALIDATION_NAME))
            root_files += [file_entry(staging, p) for p in validation_chart(staging, report, base.name, lambda _: None)]
        manifest = base.model_copy(update={
            "targets": targets, "root_files": root_files, "build_key": key, "recipe_sha256": recipe.sha256(),
            "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        (staging / MANIFEST_NAME).write_text(manifest.to_json())
        if sign_key:
            from inferneo_runtime.signing import sign_artifact

            sign_artifact(staging, sign_key)
    if cache:
        store(key, output, cache)
    return {"ok": True, "output": str(output), "name": manifest.name, "seconds": round(time.perf_counter() - t0, 2),
            "cached": None, "build_key": key, "merged_from": [n for n, _ in parts], "targets": _targets(manifest)}


def _run_ray(jobs: list[_Job], *, force: bool, cache: Optional[str], sign_key: Optional[Path], split_targets: bool,
             address: Optional[str], log) -> list[dict]:
    from .build import Progress
    from .build_cache import reuse

    ray = _ray(address)
    remote = ray.remote(_task)
    here = ray.get_runtime_context().get_node_id()
    cwd = os.getcwd()
    results: list[Optional[dict]] = [None] * len(jobs)
    pending: dict = {}  # ray ref -> (job index, target name or None, sub-output)
    keys: dict[int, str] = {}
    for i, job in enumerate(jobs):
        try:
            key = keys[i] = build_key_of(job.recipe)
            if not force:  # already built (here, or by anyone into the cache): no task at all
                hit = reuse(key, job.output, cache, Progress(quiet=True))
                if hit is not None:
                    m, where = hit
                    if sign_key:
                        from inferneo_runtime.signing import sign_artifact

                        sign_artifact(job.output, sign_key)
                    results[i] = {"ok": True, "recipe": str(job.path), "output": str(job.output), "name": m.name,
                                  "seconds": 0.0, "cached": where, "build_key": key, "targets": _targets(m)}
                    continue
            split = split_targets and len(job.recipe.targets) > 1
            for target in (job.recipe.targets if split else [None]):
                sub = _sub_recipe(job.recipe, target) if target is not None else job.recipe
                name = job.recipe.target_name(target) if target is not None else None
                out = job.output.parent / WORK_DIR / job.recipe.name / name if name else job.output
                gpu = any(t.format == "tensorrt" or getattr(t, "device", "cpu") == "cuda" for t in sub.targets)
                ref = remote.options(num_cpus=1, num_gpus=1 if gpu else 0).remote(
                    sub.model_dump_json(), str(out), cwd, cache, force, name,
                    bool(target is not None and target.optional))
                pending[ref] = (i, name, out)
                log(f"task: {job.recipe.name}" + (f" / {name}" if name else ""))
        except Exception as e:  # noqa: BLE001 - one bad recipe does not stop the others
            results[i] = _failure(e, job.path)
    parts: dict[int, list] = {}
    errors: dict[int, BaseException] = {}
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        i, name, out = pending.pop(ready[0])
        try:
            summary = ray.get(ready[0])
        except Exception as e:  # noqa: BLE001
            cause = getattr(e, "cause", None) or e
            errors.setdefault(i, cause)
            continue
        if name is None:
            if summary.get("node") != here:  # built on another node: materialize it here from the cache
                summary = build_locked(jobs[i].recipe, jobs[i].output, cache=cache)
            summary.pop("node", None), summary.pop("target", None)
            results[i] = summary | {"recipe": str(jobs[i].path), "tasks": 1}
        else:
            if summary.get("skipped"):
                parts.setdefault(i, []).append((name, summary["skipped"]))
            else:
                if summary.get("node") != here:
                    sub = _sub_recipe(jobs[i].recipe, next(t for t in jobs[i].recipe.targets
                                                           if jobs[i].recipe.target_name(t) == name))
                    build_locked(sub, out, cache=cache)
                parts.setdefault(i, []).append((name, out))
    for i, job in enumerate(jobs):
        if i in errors:
            results[i] = _failure(errors[i], job.path)
        elif results[i] is None and i in parts:
            order = [job.recipe.target_name(t) for t in job.recipe.targets]
            try:
                merged = _merge(job.recipe, keys[i], sorted(parts[i], key=lambda p: order.index(p[0])), job.output,
                                cache, sign_key)
                results[i] = merged | {"recipe": str(job.path), "tasks": len(parts[i])}
            except Exception as e:  # noqa: BLE001
                results[i] = _failure(e, job.path)
            finally:
                shutil.rmtree(job.output.parent / WORK_DIR / job.recipe.name, ignore_errors=True)
    return results


# -- the command ------------------------------------------------------------------------------------------
def run_fanout(path: Path, output_root: Optional[Path] = None, *, quiet: bool = False, force: bool = False,
               cache: Optional[str] = None, sign_key: Optional[Path] = None, use_ray: bool = False,
               split_targets: bool = True, address: Optional[str] = None) -> dict:
    """Build every recipe in directory `path` (or the one recipe file `path`). Failures do not stop the
    other recipes; the summary lists each recipe's result, and `ok` is False if any failed."""
    from rich.console import Console

    console = Console(stderr=True, quiet=quiet)
    t0 = time.perf_counter()
    paths = find_recipes(path) if Path(path).is_dir() else [Path(path)]
    jobs: list[_Job] = []
    results: list[dict] = []
    for p in paths:
        try:
            recipe = load_recipe(p)
            jobs.append(_Job(p, recipe, _output_for(recipe, output_root)))
        except RecipeError as e:
            results.append(_failure(e, p))
    outputs = [j.output for j in jobs]
    clash = sorted({str(o) for o in outputs if outputs.count(o) > 1})
    if clash:
        raise FanoutError(f"several recipes write the same output: {', '.join(clash)}; give each its own `output`")
    if use_ray:
        results += _run_ray(jobs, force=force, cache=cache, sign_key=sign_key, split_targets=split_targets,
                            address=address, log=lambda m: console.print(f"  [dim]{m}[/dim]"))
    else:
        for job in jobs:
            console.print(f"[bold]{job.path}[/bold]")
            try:
                results.append(build_locked(job.recipe, job.output, quiet=quiet, force=force, cache=cache,
                                            sign_key=sign_key, path=job.path))
            except Exception as e:  # noqa: BLE001 - one failed recipe does not stop the others
                results.append(_failure(e, job.path))
    order = {str(p): n for n, p in enumerate(paths)}
    results.sort(key=lambda r: order.get(r.get("recipe") or "", 0))
    failed = [r for r in results if not r["ok"]]
    return {"ok": not failed, "recipes": results, "built": sum(1 for r in results if r["ok"] and not r.get("cached")),
            "cached": sum(1 for r in results if r["ok"] and r.get("cached")), "failed": len(failed),
            "ray": use_ray, "seconds": round(time.perf_counter() - t0, 2),
            "exit_code": failed[0]["exit_code"] if failed else 0}
