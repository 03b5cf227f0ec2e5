"""The model list and cards, and the management API: register / load / unload / unregister models, routing
rules and A/B tests (guarded by admin_guard.py; what may be registered, by registration_policy.py)."""
from __future__ import annotations

import asyncio
import logging

from fastapi import Depends, FastAPI, Request

from ...errors import InferneoError
from ...model_config import ModelConfig
from ...registry import CapacityError, Entry, RegistryError
from ..errors import ADMIN_RESPONSES, ERROR_RESPONSES, error_info, error_response, registration_error
from ..protocol import ABTestRequest, ModelCard, ModelList, RegisterModelRequest, RoutingRuleRequest
from ..registration_policy import RegistrationRefused, check_registration
from ..routing import RoutingError
from ..state import ServerState

logger = logging.getLogger("inferneo.server")
# what a model card says only to admins: where the model came from and how its load failed
ADMIN_ONLY_FIELDS = ("source", "notes", "adapters", "model_class")


def add_routes(app: FastAPI, state: ServerState) -> None:
    registry, config, guard = state.registry, state.config, state.guard

    def admin(request: Request) -> None:
        guard.check(request)

    def public_card(e: Entry, request: Request) -> ModelCard:
        """A model's card; to non-admins without paths, notes or load errors (which hold paths and tracebacks)."""
        card = state.card(e)
        if guard.is_admin(request):
            return card
        data = card.model_dump()
        for name in ADMIN_ONLY_FIELDS:
            data.pop(name, None)
        if data.get("error"):
            data["error"] = "the last load failed (details for admins)"
        return ModelCard(**data)

    @app.get("/v1/models", response_model=ModelList)
    async def list_models(request: Request):
        return ModelList(data=[public_card(e, request) for e in list(registry.entries.values())])

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=ERROR_RESPONSES)
    async def get_model(model_id: str, request: Request):
        return public_card(registry.entry(model_id), request)

    # -- model management
    @app.post("/v1/models", status_code=201, response_model=ModelCard, responses=ADMIN_RESPONSES,
              dependencies=[Depends(admin)])
    async def register_model(body: RegisterModelRequest):
        values = body.model_dump(exclude={"load"}, exclude_none=True)
        signed = bool(getattr(registry, "trusted_keys", None))
        try:
            check_registration(body.path, config, signed)
            for field, paths in (("tokenizer", [body.tokenizer] if body.tokenizer else []),
                                 ("adapters", body.adapters or [])):
                for path in paths:
                    check_registration(path, config, signed, field)
        except RegistrationRefused as e:
            logger.warning("refused to register %s over the API: %s", body.path[:200], e)
            return error_response(*error_info(e))
        for key, default in (("format", config.model_type), ("dtype", config.dtype),
                             ("quantization", config.quantization), ("tokenizer", config.tokenizer)):
            values.setdefault(key, default)
        try:
            spec = ModelConfig.model_validate({k: v for k, v in values.items() if v is not None})
            entry = await asyncio.to_thread(registry.register, spec=spec)
        except (InferneoError, ValueError, OSError) as e:
            status, info = registration_error(e)
            return error_response(status, info)
        if body.load:
            try:
                await state.wait_registry(registry.load, entry.key)
            except BaseException as e:
                await asyncio.to_thread(_forget, registry, entry.key)  # a model that failed to load is not kept
                if isinstance(e, InferneoError) and not isinstance(e, (CapacityError, RegistryError)):
                    return error_response(*registration_error(e))
                raise
        logger.info("model %s: registered from %s", entry.key, entry.source)
        return state.card(entry)

    @app.post("/v1/models/{model_id:path}/load", response_model=ModelCard, responses=ADMIN_RESPONSES,
              dependencies=[Depends(admin)])
    async def load_model(model_id: str):
        entry = registry.entry(model_id)
        await state.wait_registry(registry.load, entry.key)
        return state.card(entry)

    @app.post("/v1/models/{model_id:path}/unload", response_model=ModelCard, responses=ADMIN_RESPONSES,
              dependencies=[Depends(admin)])
    async def unload_model(model_id: str):
        return state.card(await asyncio.to_thread(registry.unload, registry.entry(model_id).key))

    @app.delete("/v1/models/{model_id:path}", responses=ADMIN_RESPONSES, dependencies=[Depends(admin)])
    async def unregister_model(model_id: str):
        entry = await asyncio.to_thread(registry.unregister, registry.entry(model_id).key)
        return {"id": entry.key, "object": "model", "deleted": True}

    @app.get("/v1/routing", dependencies=[Depends(admin)], responses=ADMIN_RESPONSES)
    async def get_routing():
        return state.router.to_dict()

    @app.post("/v1/routing/rules", status_code=201, dependencies=[Depends(admin)], responses=ADMIN_RESPONSES)
    async def add_rule(body: RoutingRuleRequest):
        return state.router.add_rule(body.name, body.condition, body.model, body.priority).to_dict()

    @app.delete("/v1/routing/rules/{name}", dependencies=[Depends(admin)], responses=ADMIN_RESPONSES)
    async def delete_rule(name: str):
        state.router.remove_rule(name)
        return {"name": name, "deleted": True}

    @app.get("/v1/ab_tests", dependencies=[Depends(admin)], responses=ADMIN_RESPONSES)
    async def list_ab_tests():
        return {"data": state.router.to_dict()["ab_tests"]}

    @app.post("/v1/ab_tests", status_code=201, dependencies=[Depends(admin)], responses=ADMIN_RESPONSES)
    async def add_ab_test(body: ABTestRequest):
        return state.router.add_ab_test(body.name, body.model_a, body.model_b, body.traffic_split,
                                        body.sticky).to_dict()

    @app.get("/v1/ab_tests/{name}", dependencies=[Depends(admin)], responses=ADMIN_RESPONSES)
    async def get_ab_test(name: str):
        test = state.router.ab_tests.get(name)
        if test is None:
            raise RoutingError(f"no A/B test {name!r}; tests: {', '.join(state.router.ab_tests) or 'none'}",
                               code="not_found")
        return test.to_dict()

    @app.delete("/v1/ab_tests/{name}", dependencies=[Depends(admin)], responses=ADMIN_RESPONSES)
    async def delete_ab_test(name: str):
        state.router.remove_ab_test(name)
        return {"name": name, "deleted": True}


def _forget(registry, key: str) -> None:
    try:
        registry.unregister(key)
    except Exception as e:  # noqa: BLE001 - the load error is what the caller needs to see
        logger.warning("model %s: failed to load and could not be unregistered: %s", key, e)
