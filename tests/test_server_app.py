"""server.app without a model: the OpenAPI schema documents every route and the request fields."""

from __future__ import annotations

from pathlib import Path


def test_openapi_documents_every_route(fake_bundle: Path) -> None:
    from server.app import ROUTES, create_app
    from server.config import ServerConfig

    schema = create_app(ServerConfig(bundle=str(fake_bundle), device="cpu")).openapi()
    assert set(ROUTES) <= set(schema["paths"])
    body = schema["paths"]["/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"prompt", "messages", "alpha", "on_abstain", "return_exemplars", "max_attempts"} <= set(body["properties"])
    assert "ChatMessage" in schema["components"]["schemas"]
