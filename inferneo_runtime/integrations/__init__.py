"""Plug-ins for serving engines people already operate: Ray Serve, KServe, Triton (python backend).

`inferneo serve` is the embedded default (one process). These modules put the same runtime behind an
engine that runs many replicas; none of them is a cluster manager of its own. Each needs its own extra
(`inferneo[ray]`, `inferneo[kserve]`; Triton brings its own python backend) and imports it only when used,
so `import inferneo_runtime.integrations` costs nothing.

- `ray_serve`: a Ray Serve deployment whose replicas serve `inferneo serve`'s FastAPI app (@serve.ingress).
- `kserve`: a `kserve.Model` predictor (v1 and v2 inference protocols) over the engine driver.
- `triton_model.py`: the python-backend `model.py` that `inferneo deploy triton` copies into a model repository.
- `common`: loading, warm-up and readiness shared by all three.
"""
