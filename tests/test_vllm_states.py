"""The pieces of the engine head input that run without vLLM: how recorded states are assembled by position and
when the vLLM backend takes its head input from the engine or from a transformers pass. The engine itself is
exercised in tests/test_server_vllm.py."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sdm_core.lm.embedding import HiddenStateRecipe, pool_states


def test_recorded_chunks_are_placed_by_position_and_a_gap_gives_none() -> None:
    from server.backends.vllm_states import _Table

    states = torch.randn(7, 4)
    table = _Table()
    # A chunked prefill (positions 0-2, then 3-5) and one decode step (6), recorded out of order.
    table.chunks.append((torch.tensor([3, 4, 5]), states[3:6]))
    table.chunks.append((torch.tensor([0, 1, 2]), states[0:3]))
    table.chunks.append((torch.tensor([6]), states[6:7]))
    assert torch.equal(table.states(7), states)
    assert torch.equal(table.states(5), states[:5])
    assert table.states(8) is None, "position 7 was never computed"
    holed = _Table()
    holed.chunks.append((torch.tensor([0, 1, 3]), states[[0, 1, 3]]))
    assert holed.states(4) is None and torch.equal(holed.states(2), states[:2])


def test_pop_pools_with_the_recipe_and_forgets_the_request() -> None:
    from server.backends.vllm_states import StateCaptureExtension, _Table

    states = torch.randn(5, 4)
    worker = StateCaptureExtension()
    worker.model_runner = SimpleNamespace(
        _sdm_tables={"sdm-cap-abc-1234abcd": _Table(), "sdm-cap-other-5678": _Table()}
    )
    worker.model_runner._sdm_tables["sdm-cap-abc-1234abcd"].chunks.append((torch.arange(5), states))
    recipe = HiddenStateRecipe(order="last_mean")
    got = worker.sdm_capture_pop("sdm-cap-abc", 4, recipe.to_dict())
    assert torch.equal(torch.tensor(got, dtype=torch.float32), pool_states(states[:4], recipe))
    assert worker.sdm_capture_count() == 1 and worker.sdm_capture_pop("sdm-cap-abc", 4, recipe.to_dict()) is None
    assert worker.sdm_capture_drop(["sdm-cap-other"]) == 1 and worker.sdm_capture_count() == 0


def _info(layer: int = -1):
    return SimpleNamespace(path=Path("bundle"), recipe=HiddenStateRecipe(layer=layer))


def test_head_input_choice() -> None:
    from server.backends.base import BackendError
    from server.backends.vllm_backend import choose_head_input

    assert choose_head_input("auto", _info(), torch.float32) == "engine"
    assert choose_head_input("auto", _info(), torch.bfloat16) == "transformers"
    assert choose_head_input("engine", _info(), torch.bfloat16) == "engine"
    assert choose_head_input("auto", _info(layer=-2), torch.float32) == "transformers"
    assert choose_head_input("transformers", _info(), torch.float32) == "transformers"
    with pytest.raises(BackendError, match="--vllm-hidden-states transformers"):
        choose_head_input("engine", _info(layer=-2), torch.float32)
    with pytest.raises(BackendError, match="head_input must be one of"):
        choose_head_input("pooling", _info(), torch.float32)
