"""``GET /v1/models``: the served model (OpenAI's model list), with the bundle's facts under ``sdm``."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from starlette.requests import Request

from server.protocol import ModelCard, ModelList
from server.routes.common import GET_ERRORS, server_state

__all__ = ["router"]

router = APIRouter()


@router.get("/v1/models", response_model=ModelList, responses=GET_ERRORS)
async def models(request: Request) -> ModelList:
    state = server_state(request)
    served = state.manager.hold()
    try:
        facts = served.facts
        card = ModelCard(
            id=state.config.served_model_name,
            created=int(served.loaded_at),
            root=Path(facts["bundle"]).name,
            max_model_len=served.backend.max_model_len,
            sdm={k: v for k, v in facts.items() if k not in ("model", "bundle")},
        )
        return ModelList(data=[card])
    finally:
        state.manager.release(served)
