"""The HTTP routes, one module per route family (as vLLM's entrypoints): each holds an ``APIRouter`` whose handlers
find this app's objects on ``request.app.state.server`` (:class:`server.app.ServerState`), and, for the
generation routes, the serving class that turns a parsed request into its response.

- ``operations.py``: ``GET /health``, ``GET /ready``, ``GET /metrics``
- ``models.py``: ``GET /v1/models``
- ``generate.py``: ``POST /generate``
- ``openai.py``: what the OpenAI-compatible routes share (refused OpenAI features, streamed or not)
- ``completions.py``: ``POST /v1/completions``
- ``chat.py``: ``POST /v1/chat/completions``
- ``feedback.py``: ``POST /v1/feedback``
- ``admin.py``: ``POST /admin/reload``
- ``common.py``: the error responses and request-body schemas the routes declare in OpenAPI
"""
