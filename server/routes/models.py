"""``GET /v1/models``: the served models (OpenAI's model list; the default first), each with its bundle's facts
under ``sdm``."""

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
    manager = server_state(request).manager
    cards = []
    for name in manager.names:
        served = manager.hold(name)
        try:
            facts = served.facts
            cards.append(
                ModelCard(
                    id=name,
                    created=int(served.loaded_at),
                    root=Path(facts["bundle"]).name,
                    max_model_len=served.backend.max_model_len,
                    sdm={k: v for k, v in facts.items() if k not in ("model", "bundle")},
                )
            )
        finally:
            manager.release(served)
    return ModelList(data=cards)
