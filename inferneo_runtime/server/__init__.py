"""The OpenAI-compatible HTTP server (`inferneo serve`).

`app` (FastAPI) and `metrics` (prometheus-client) need the `serve` extra and are imported only by
`inferneo serve`; `protocol` and `config` need nothing beyond the runtime's own dependencies.
This package's __init__ imports nothing, so `import inferneo_runtime.server.config` stays slim.
"""
