"""Fully sharded fine-tuning (FSDP2, training/accelerate/fsdp.yaml) as two CPU processes: the same run as one process,
written as full tensors, and resumed after a crash.

accelerate 1.15 turns FSDP on only for GPU-type process groups: two CPU processes get plain data parallel
(MULTI_CPU), and ``accelerate launch --cpu`` starts a single process. So this test asks accelerate's own launcher
code for the environment that ``accelerate launch --config_file training/accelerate/fsdp.yaml`` gives its processes,
starts two CPU processes (gloo) with torchrun, and in each of them (this file is their entry point, see the end)
marks accelerate's state as FSDP before ``training.finetune`` runs. From there accelerate's FSDP2 preparation
(``fully_shard`` on every decoder layer, on the tied embedding / final norm / LM head group and on the root) and
the training code run unchanged, so the no-grad passes through the sharded root, the synchronised generation and
the gathered checkpoints and models are exercised as on GPUs.

The first test compares with one process (the same 8 documents a step: micro-batch 4 x accumulation 2, or 2 x 2 on
each of two ranks) and resumes after a crash; the second trains LoRA adapters (the root is then the peft model);
the third decodes with ranks that hold different numbers of prompts.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")
FSDP_CONFIG = ROOT / "training" / "accelerate" / "fsdp.yaml"
# Read by this file's torchrun entry point (below): every rank exits right after the checkpoint of that step.
CRASH_AFTER_STEP = "SDM_TEST_CRASH_AFTER_STEP"


def _fsdp2_available() -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule, fully_shard  # noqa: F401
    except ImportError:
        return False
    return torch.distributed.is_available() and torch.distributed.is_gloo_available()


def _fsdp_environment() -> dict[str, str]:
    """The FSDP_* / ACCELERATE_* variables that ``accelerate launch`` derives from fsdp.yaml (the tiny model is a
    Llama)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(
        [
            "--config_file",
            str(FSDP_CONFIG),
            "--num_processes",
            "2",
            "--fsdp_transformer_layer_cls_to_wrap",
            "LlamaDecoderLayer",
            "-m",
            "training.finetune",
        ]
    )
    args, _, _ = _validate_launch_command(args)
    env = prepare_multi_gpu_env(args)
    fsdp = {k: v for k, v in env.items() if k.startswith(("FSDP_", "ACCELERATE_"))}
    assert fsdp.get("ACCELERATE_USE_FSDP") == "true" and fsdp.get("FSDP_VERSION") == "2", fsdp
    return fsdp


def _run(command: list[str], out: Path, extra_env: dict[str, str] | None = None, check: bool = True) -> dict | int:
    """The run's result line (``check``), or its exit status."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("FSDP_", "ACCELERATE_", "SDM_TEST_"))}
    env = {
        **base,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(ROOT),
        "CUDA_VISIBLE_DEVICES": "",
        **(extra_env or {}),
    }
    done = subprocess.run(
        command + ["--preset", "tiny", "--output-dir", str(out), "--gradient-accumulation", "2"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if not check:
        return done.returncode
    assert done.returncode == 0, done.stderr[-4000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, f"only rank 0 prints the result: {lines}"
    return json.loads(lines[0])


def _history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _same_layout(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name].shape, a[name].dtype) == (b[name].shape, b[name].dtype), name


@pytest.mark.slow
@pytest.mark.skipif(
    not _fsdp2_available() or not TORCHRUN.exists(),
    reason="needs torch.distributed with gloo, FSDP2 (fully_shard) and torchrun",
)
def test_two_process_fsdp_matches_one_process_and_resumes(tmp_path: Path) -> None:
    single = _run([sys.executable, "-m", "training.finetune", "--micro-batch-size", "4"], tmp_path / "single")
    fsdp_dir = tmp_path / "fsdp"
    fsdp_dir.mkdir()
    shutil.copytree(tmp_path / "single" / "data", fsdp_dir / "data")
    fsdp = [
        str(TORCHRUN),
        "--standalone",
        "--nproc_per_node",
        "2",
        str(Path(__file__).resolve()),
        "--micro-batch-size",
        "2",
    ]
    env = _fsdp_environment()

    # Killed right after the step-2 checkpoint (the end of epoch 1): gathered on rank 0 into full, unsharded tensors.
    assert _run(fsdp, fsdp_dir, {**env, CRASH_AFTER_STEP: "2"}, check=False) != 0
    marker = json.loads((fsdp_dir / "checkpoint" / "checkpoint.json").read_text())
    assert marker["trainer"]["step"] == 2
    _same_layout(
        load_file(str(fsdp_dir / "checkpoint" / "trainable.safetensors")),
        load_file(str(tmp_path / "single" / "checkpoint" / "trainable.safetensors")),
    )
    _same_layout(
        load_file(str(fsdp_dir / "checkpoint" / "optimizer.safetensors")),
        load_file(str(tmp_path / "single" / "checkpoint" / "optimizer.safetensors")),
    )

    resumed = _run(fsdp + ["--resume"], fsdp_dir, env)
    assert resumed["steps"] == single["steps"] == 4
    one, two = _history(tmp_path / "single"), _history(fsdp_dir)
    assert [r["step"] for r in two] == [r["step"] for r in one]
    for a, b in zip(one, two):
        # Within 1 %, as the SDM comparison of tests/test_training_ddp.py explains: each rank's h of a step comes from
        # other batch compositions than one process's, and b, a step function of h, can jump at the tiny model's
        # near-ties (seen: 0.2 % at step 1, the same jump as under DDP).
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-2), (a, b)
        assert b["mean_base"] == pytest.approx(a["mean_base"], rel=1e-2)
        assert b["hard_negatives"] == a["hard_negatives"]
        if "eval_loss" in a:
            # Looser: sharded gradient norms round differently (~1e-6), and the SDM layer fitted for the evaluation
            # turns such differences into small jumps of b (seen: 0.5 % at step 4).
            assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=5e-2)
    assert one[-1]["hard_negatives"] > 0, "epoch 2 generated hard negatives (synchronised generation on both ranks)"

    # The same files as the one-process run: full tensors, the tied LM head dropped as save_pretrained drops it.
    final_one = load_file(str(tmp_path / "single" / "final" / "model.safetensors"))
    final_two = load_file(str(fsdp_dir / "final" / "model.safetensors"))
    _same_layout(final_one, final_two)
    for name in final_one:  # within 1 % of each tensor's norm (a jump of b moves its gradients)
        gap = (final_one[name] - final_two[name]).norm()
        assert gap <= 1e-2 * final_one[name].norm(), (name, float(gap))
    _same_layout(
        load_file(str(fsdp_dir / "checkpoint" / "trainable.safetensors")),
        load_file(str(tmp_path / "single" / "checkpoint" / "trainable.safetensors")),
    )
    assert json.loads((fsdp_dir / "checkpoint" / "optimizer.json").read_text()) == json.loads(
        (tmp_path / "single" / "checkpoint" / "optimizer.json").read_text()
    ), "parameter indices and groups as unsharded"

    from transformers import AutoModelForCausalLM

    best = AutoModelForCausalLM.from_pretrained(fsdp_dir / "best")
    assert best.config.architectures == ["LlamaForCausalLM"]
    with torch.no_grad():
        assert torch.isfinite(best(input_ids=torch.tensor([[1, 2, 3]])).logits).all()


@pytest.mark.slow
@pytest.mark.skipif(
    not _fsdp2_available() or not TORCHRUN.exists(),
    reason="needs torch.distributed with gloo, FSDP2 (fully_shard) and torchrun",
)
def test_two_process_fsdp_lora(tmp_path: Path) -> None:
    """LoRA under FSDP2: the root is the peft model, whose generate decodes through the inner model (so it must be
    registered as a forward of the root) and whose checkpoint and adapter hold only the gathered LoRA tensors."""
    out = tmp_path / "lora"
    fsdp = [
        str(TORCHRUN),
        "--standalone",
        "--nproc_per_node",
        "2",
        str(Path(__file__).resolve()),
        "--micro-batch-size",
        "2",
        "--lora",
        "true",
        "--lora-r",
        "4",
        "--epochs",
        "1",
        "--generate-from-epoch",
        "0",
    ]
    result = _run(fsdp, out, _fsdp_environment())
    history = _history(out)
    assert result["steps"] == 2 and [r["step"] for r in history] == [1, 2] and "eval_loss" in history[-1]
    assert history[-1]["hard_negatives"] > 0, "hard negatives were generated through the sharded peft model"
    weights = load_file(str(out / "checkpoint" / "trainable.safetensors"))
    adapter = load_file(str(out / "final" / "adapter_model.safetensors"))
    assert weights and all(".lora_" in name for name in weights), sorted(weights)[:3]
    assert len(adapter) == len(weights)
    for name, value in weights.items():
        assert value.shape == ((4, value.shape[1]) if ".lora_A." in name else (value.shape[0], 4)), (name, value.shape)


@pytest.mark.slow
@pytest.mark.skipif(
    not _fsdp2_available() or not TORCHRUN.exists(),
    reason="needs torch.distributed with gloo, FSDP2 (fully_shard) and torchrun",
)
def test_synced_generation_with_uneven_prompts() -> None:
    """Ranks of a sharded model with different numbers of prompts (here none and three, in batches of two) decode
    the same as an unsharded model, instead of waiting forever on each other's forwards."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(ROOT),
        "CUDA_VISIBLE_DEVICES": "",
    }
    done = subprocess.run(
        [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", str(Path(__file__).resolve()), "--synced-generation"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert sorted(line for line in done.stdout.splitlines() if line.startswith("generation ok")) == [
        "generation ok 0",
        "generation ok 1",
    ]


def _synced_generation() -> None:
    """The torchrun entry point of test_synced_generation_with_uneven_prompts."""
    import copy

    from torch.distributed.fsdp import fully_shard

    from sdm_core.lm.embedding import ChatFormat
    from sdm_core.lm.models import load_model, load_tokenizer
    from training.generation import greedy_generate

    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    tokenizer = load_tokenizer({"kind": "tiny"})
    model = load_model({"kind": "tiny", "seed": 0})
    plain = copy.deepcopy(model)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    prompts = (
        []
        if rank == 0
        else ["Order these words: b a c", "Say yes", "A third prompt, a little longer than the other two"]
    )
    got = greedy_generate(model, tokenizer, prompts, ChatFormat(), max_new_tokens=6, batch_size=2, synced=True)
    assert got == greedy_generate(plain, tokenizer, prompts, ChatFormat(), max_new_tokens=6, batch_size=2), got
    torch.distributed.destroy_process_group()
    print(f"generation ok {rank}")


if __name__ == "__main__":
    if sys.argv[1:] == ["--synced-generation"]:
        _synced_generation()
        sys.exit(0)
    # The entry point of each torchrun process: accelerate's state becomes FSDP (as on GPUs) where accelerate would
    # otherwise settle for MULTI_CPU; everything else is `python -m training.finetune`.
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    _init = AcceleratorState.__init__

    def _init_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs) -> None:
        _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as accelerate does for GPUs

    AcceleratorState.__init__ = _init_fsdp_on_cpu

    import training.trainer
    from training.finetune import main

    _trainer_init = training.trainer.SDMTrainer.__init__

    def _sharded_trainer(self, *args, **kwargs) -> None:  # a run that silently fell back to DDP would prove nothing
        _trainer_init(self, *args, **kwargs)
        if not self.sharded:
            raise RuntimeError("accelerate did not shard the model (FSDP2); the test's FSDP set-up no longer works")

    training.trainer.SDMTrainer.__init__ = _sharded_trainer

    from crashing_finetune import CrashAfterCheckpoint  # tests/ is this script's directory, first on sys.path

    crash_after = os.environ.get(CRASH_AFTER_STEP)
    sys.exit(main(sys.argv[1:], callbacks=[CrashAfterCheckpoint(int(crash_after))] if crash_after else []))
