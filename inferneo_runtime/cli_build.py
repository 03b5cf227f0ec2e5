"""Commands that make and ship artifacts: `build`, `push`, `pull` and `deploy`. Those that need the builder import
`inferneo_build` only when they run (a runtime-only host still lists them, and says which extra to install)."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from .cli_base import app, err, needs_extra, out, run_command
from .cli_views import show_built

JSON_SUMMARY = "print a JSON summary on stdout"


@app.command()
def build(
    recipe: Path = typer.Argument(..., help="recipe YAML file, or a directory of them (each is built)"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="artifact directory (default: the recipe's "
                                          "output); for a directory of recipes: the folder for <name>/ outputs"),
    as_json: bool = typer.Option(False, "--json", help=JSON_SUMMARY),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress output"),
    force: bool = typer.Option(False, "--force", help="rebuild even when the output is up to date, and replace an "
                               "output that is not an artifact"),
    cache: Optional[str] = typer.Option(None, "--cache", envvar="INFERNEO_BUILD_CACHE",
                                        help="s3://bucket/prefix build cache shared between CI jobs"),
    sign: Optional[Path] = typer.Option(None, "--sign", help="Ed25519 private key: sign the manifest"),
    ray: bool = typer.Option(False, "--ray", help="one Ray task per recipe and per target, on a local cluster or "
                             "RAY_ADDRESS's (needs inferneo\\[ray])"),
):
    r"""Build a recipe into a validated artifact (needs inferneo\[build])."""

    def go():
        with needs_extra("build"):
            from inferneo_build.cli import run_build
        if recipe.is_dir() or ray:  # many recipes and/or Ray tasks: inferneo_build/fanout.py
            return _fan_out(recipe, output, as_json=as_json, quiet=quiet, force=force, cache=cache, sign=sign, ray=ray)
        summary = run_build(recipe, output, quiet=quiet or as_json, force=force, cache=cache, sign_key=sign)
        if as_json:
            print(json.dumps(summary))
        else:
            show_built(summary, out)

    run_command(go, as_json)


def _fan_out(path: Path, output: Optional[Path], *, as_json: bool, quiet: bool, force: bool,
             cache: Optional[str], sign: Optional[Path], ray: bool) -> None:
    with needs_extra("build"):
        from inferneo_build.fanout import run_fanout
    summary = run_fanout(path, output, quiet=quiet or as_json, force=force, cache=cache, sign_key=sign, use_ray=ray)
    if as_json:
        print(json.dumps(summary))
    else:
        for r in summary["recipes"]:
            if r["ok"]:
                show_built(r, out)
            else:
                err.print(f"[red]failed[/red] {r['recipe']}: {escape(r['message'])}", highlight=False)
        out.print(f"{len(summary['recipes'])} recipe(s): {summary['built']} built, {summary['cached']} cached, "
                  f"{summary['failed']} failed in {summary['seconds']:.1f}s" + (" (Ray)" if ray else ""))
    if not summary["ok"]:
        raise typer.Exit(summary["exit_code"])


@app.command()
def push(
    artifact: Path = typer.Argument(..., help="artifact directory"),
    uri: str = typer.Argument(..., help="s3://bucket/prefix"),
    jobs: int = typer.Option(8, "--jobs", "-j", min=1, help="parallel uploads"),
    as_json: bool = typer.Option(False, "--json", help=JSON_SUMMARY),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
    sign: Optional[Path] = typer.Option(None, "--sign", help="Ed25519 private key: sign the manifest before pushing"),
):
    """Publish an artifact to S3: files, then the manifest, then LATEST (needs inferneo\\[build,s3])."""

    def go():
        with needs_extra("push"):
            from inferneo_build.push import push as run_push
        if sign:
            from .signing import sign_artifact

            sign_artifact(artifact, sign)
        summary = run_push(artifact, uri, jobs=jobs, progress=not (quiet or as_json))
        if summary["not_pushed"] and not as_json:
            err.print(f"[yellow]warning:[/yellow] not in the manifest, so not pushed: {', '.join(summary['not_pushed'])}",
                      highlight=False)
        if as_json:
            print(json.dumps(summary))
        elif summary["uploaded"] == 0 and not summary["latest_updated"]:
            out.print(f"nothing to upload: {summary['uri']} already publishes {summary['name']} version "
                      f"{summary['version'][:12]} ({summary['files']} files verified)", highlight=False)
        else:
            out.print(f"[green]published[/green] {summary['name']} version {summary['version'][:12]} at {summary['uri']}: "
                      f"uploaded {summary['uploaded']} of {summary['files']} files "
                      f"({summary['bytes_uploaded'] / 1e6:.1f} MB) in {summary['seconds']:.1f}s", highlight=False)

    run_command(go, as_json)


@app.command()
def pull(
    uri: str = typer.Argument(..., help="s3://bucket/prefix (LATEST) or s3://bucket/prefix/versions/<sha256>"),
    dest: Path = typer.Argument(..., help="directory to write the artifact to"),
    force: bool = typer.Option(False, "--force", help="replace DEST if it holds something else"),
    jobs: int = typer.Option(8, "--jobs", "-j", min=1, help="parallel downloads"),
    as_json: bool = typer.Option(False, "--json", help=JSON_SUMMARY),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
):
    """Download an artifact from S3 into the verified cache and copy it to DEST (needs inferneo\\[s3])."""

    def go():
        from .s3 import pull as run_pull

        summary = run_pull(uri, dest, force=force, progress=not (quiet or as_json), jobs=jobs)
        if as_json:
            print(json.dumps(summary))
        else:
            how = "already up to date" if summary["up_to_date"] else "verified and written"
            src = "downloaded" if summary["downloaded"] else "from cache"
            out.print(f"[green]{how}[/green] {summary['dest']}: {summary['name']} version {summary['version'][:12]} "
                      f"({summary['files']} files, {summary['bytes'] / 1e6:.1f} MB, {src})", highlight=False)

    run_command(go, as_json)


# -- deploy bundles (inferneo_build/deploy.py) -------------------------------------------------------------
deploy_app = typer.Typer(no_args_is_help=True, help="Write an artifact as another serving engine's bundle: a "
                         "Triton model repository, an LMI serving.properties, a KServe InferenceService.")
app.add_typer(deploy_app, name="deploy")


def _deploy(fn, as_json: bool, **kwargs) -> None:
    def go():
        with needs_extra("deploy"):
            from inferneo_build import deploy
        summary = getattr(deploy, fn)(**kwargs)
        if as_json:
            print(json.dumps({k: v for k, v in summary.items() if k != "yaml" or kwargs.get("out") is None}))
        elif fn == "write_kserve" and kwargs.get("out") is None:
            sys.stdout.write(summary["yaml"])
        else:
            where = summary.get("repository") or summary.get("output")
            out.print(f"[green]wrote[/green] {summary['engine']} bundle for {summary['model']} "
                      f"({summary.get('target') or summary.get('storage_uri')}) at {where}", highlight=False)

    run_command(go, as_json)


@deploy_app.command("triton")
def deploy_triton(
    artifact: str = typer.Argument(..., help="artifact directory (copied in) or s3:// URI (referenced, pinned)"),
    out_dir: Path = typer.Argument(..., help="model repository directory (other models in it are kept)"),
    target: Optional[str] = typer.Option(None, help="target to serve (default: the preferred valid one)"),
    instances: int = typer.Option(1, "--instances", min=1, help="model instances (instance_group count)"),
    device: Optional[str] = typer.Option(None, help="cuda: KIND_GPU instances (tensorrt targets always are)"),
    threads: Optional[int] = typer.Option(None, min=1, help="intra-op threads per instance"),
    default_max_tokens: Optional[int] = typer.Option(None, "--default-max-tokens", min=1),
    force: bool = typer.Option(False, "--force", help="replace this model's folder if it exists"),
    as_json: bool = typer.Option(False, "--json", help="print a JSON summary"),
):
    """Triton model repository: config.pbtxt (python backend, decoupled streaming) + 1/model.py."""
    _deploy("write_triton", as_json, artifact=artifact, out=out_dir, target=target, instances=instances,
            device=device, threads=threads, default_max_tokens=default_max_tokens, force=force)


@deploy_app.command("lmi")
def deploy_lmi(
    artifact: str = typer.Argument(..., help="s3:// URI (serving.properties points at its version prefix) or a "
                                   "directory (copied into OUT)"),
    out_dir: Path = typer.Argument(..., help="directory for serving.properties, model.py, requirements.txt"),
    target: Optional[str] = typer.Option(None, help="target to serve (default: the preferred valid one)"),
    device: Optional[str] = typer.Option(None, help="cpu or cuda[:N]"),
    threads: Optional[int] = typer.Option(None, min=1, help="intra-op threads"),
    force: bool = typer.Option(False, "--force", help="replace OUT if it is not empty"),
    as_json: bool = typer.Option(False, "--json", help="print a JSON summary"),
):
    """SageMaker / DJL LMI: serving.properties for the artifact's S3 prefix, with a python handler."""
    _deploy("write_lmi", as_json, artifact=artifact, out=out_dir, target=target, device=device, threads=threads,
            force=force)


@deploy_app.command("kserve")
def deploy_kserve(
    artifact: str = typer.Argument(..., help="s3:// URI of a pushed artifact (pinned to its current version)"),
    out_file: Optional[Path] = typer.Argument(None, help="YAML file or directory (default: print it)"),
    image: str = typer.Option(..., "--image", help="container image with inferneo[kserve] installed"),
    server: str = typer.Option("kserve", "--server", help="kserve (KServe v1/v2 protocols) or openai "
                               "(inferneo serve's OpenAI-compatible API)"),
    target: Optional[str] = typer.Option(None, help="target to serve (default: the preferred valid one)"),
    name: Optional[str] = typer.Option(None, help="InferenceService name (default: from the model name)"),
    namespace: Optional[str] = typer.Option(None, help="Kubernetes namespace"),
    service_account: Optional[str] = typer.Option(None, "--service-account", help="service account with the "
                                                  "S3 credentials"),
    min_replicas: int = typer.Option(1, "--min-replicas", min=0),
    max_replicas: Optional[int] = typer.Option(None, "--max-replicas", min=1),
    cpu: str = typer.Option("1", help="CPU request and limit"),
    memory: str = typer.Option("2Gi", help="memory request and limit"),
    gpus: int = typer.Option(0, "--gpus", min=0, help="nvidia.com/gpu per replica (tensorrt targets: at least 1)"),
    as_json: bool = typer.Option(False, "--json", help="print a JSON summary"),
):
    """KServe InferenceService whose predictor serves the S3 artifact (downloaded to /mnt/models)."""
    _deploy("write_kserve", as_json, artifact=artifact, out=out_file, image=image, server=server, target=target,
            name=name, namespace=namespace, service_account=service_account, min_replicas=min_replicas,
            max_replicas=max_replicas, cpu=cpu, memory=memory, gpus=gpus)
