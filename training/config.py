"""Fine-tuning configuration: one validated dataclass, presets, and CLI flags mirrored by ``SDM_*`` variables.

Size: the one place where every fine-tuning setting is declared, validated and preset, so a reader sees them together.

Precedence: default < preset < environment variable (``SDM_<FIELD>``) < command-line flag (sdm_core.settings).
The SDM layers fitted during fine-tuning are configured by one nested :class:`sdm_core.SDMConfig` (``config.sdm``),
whose flags keep their flat names (``--sdm-learning-rate``, ``--alpha``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sdm_core.config import SDMConfig
from sdm_core.settings import CommandLine, flatten, group, setting
from training.correctness import CORRECTNESS_HELP

__all__ = ["FinetuneConfig", "FINETUNE", "PRESETS", "parse_model_source"]


def parse_model_source(text: str) -> dict:
    """A model source from a flag's text: JSON, ``smollm2``/``tiny``, or a Hugging Face folder or hub id."""
    if text.strip().startswith("{"):
        source = json.loads(text)
        if not isinstance(source, dict):
            raise ValueError(
                f'a JSON model source must be an object such as {{"kind": "hf", "path": ...}}, got {text!r}'
            )
        return source
    if text in ("smollm2", "tiny"):
        return {"kind": text}
    return {"kind": "hf", "path": text}


@dataclass(frozen=True)
class FinetuneConfig:
    # data
    train: str = setting("", help="training records (JSONL); empty: build the word-ordering task into OUTPUT_DIR/data")
    calibration: str = setting(
        "", help="calibration records (JSONL) for evaluation and the validation SDM layer; empty: the built task's"
    )
    output_dir: str = setting(
        "runs/finetune", help="run folder: config.json, train.log, metrics.jsonl, checkpoint/, best/, final/"
    )
    correctness: str = setting(
        "word_order",
        help=CORRECTNESS_HELP
        + " (checked at start and recorded in config.json; the loop's hard negatives are every non-verbatim "
        "generation)",
    )
    max_train_docs: int = setting(0, help="use the first N training documents (0: all)")
    max_calibration_docs: int = setting(0, help="use the first N calibration documents (0: all)")
    # the task built into OUTPUT_DIR/data when no --train/--calibration are given: word_order or arithmetic
    task: str = setting(
        "word_order",
        help="task built into OUTPUT_DIR/data when no --train/--calibration are given: word_order or arithmetic",
    )
    # sentence lengths (words) when the word-ordering task is built
    task_min_words: int = setting(5, help="shortest sentence (words) when the word-ordering task is built")
    task_max_words: int = setting(60, help="longest sentence (words) when the word-ordering task is built")
    # operand digits and operations when the arithmetic task is built
    task_min_digits: int = setting(2, help="fewest digits of an operand when the arithmetic task is built")
    task_max_digits: int = setting(4, help="most digits of an operand when the arithmetic task is built")
    task_operations: tuple[str, ...] = setting(
        ("+", "-", "*"), help="comma-separated operations (+,-,*) when the arithmetic task is built"
    )
    # documents built after the training split (continuing its draw) that fine-tuning never reads: training.calibrate
    # uses them with the calibration split for the final head and its certification
    task_holdout_docs: int = setting(
        0,
        help="documents built after the training split that fine-tuning never reads (calibration and certification "
        "data for training.calibrate)",
    )
    # model
    model: dict = setting(
        default_factory=lambda: {"kind": "smollm2"},
        parse=parse_model_source,
        help='model source: smollm2, tiny, a Hugging Face folder, or JSON such as \'{"kind": "hf", "path": ...}\'',
    )
    dtype: str = setting("float32", help="float32 or bfloat16 weights and compute")
    # "bf16": the fine-tuning loop's LM passes (training steps, its SDM layers' embeddings, hard-negative decoding,
    # evaluation) run under bfloat16 autocast over float32 weights; calibration and serving stay at ``dtype``.
    mixed_precision: str = setting(
        "no", help="no, or bf16: bfloat16 autocast over float32 weights in the fine-tuning loop's LM passes only"
    )
    lora: bool = setting(False, help="train LoRA adapters (peft) instead of the full weights")
    lora_r: int = setting(8, help="LoRA rank")
    lora_alpha: int = setting(16, help="LoRA scaling alpha")
    lora_targets: tuple[str, ...] = setting(
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        help="comma-separated module names that get LoRA adapters",
    )
    # >0: train only the last N blocks (a CPU budget option): their full weights (+ final norm), or with --lora
    # LoRA adapters on those blocks only, so the backward pass stops N blocks from the top either way.
    trainable_last_layers: int = setting(0, help="train only the last N blocks (0: all), a CPU budget option")
    gradient_checkpointing: bool = setting(False, help="recompute activations in the backward pass to save memory")
    system_prompt: str | None = setting(
        "You are a helpful AI assistant.",
        help="system turn put before every prompt (and before a chat that brings none)",
    )
    # objective
    loss: str = setting(
        "sdm", help="sdm (Eq. 1, base 2 + SDM(z')_y) or ce (the cross-entropy baseline on the same encoding)"
    )
    gamma_positive: float = setting(0.5, help="probability that a document's instance is its positive")
    gamma_generate: float = setting(
        0.5, help="probability that a negative instance is a fresh greedy generation (hard negative)"
    )
    generate_from_epoch: int = setting(1, help="0-based epoch from which hard negatives are generated")
    # "step" (reference): a document drawn for generation is decoded in its own step with the current weights.
    # "epoch": all of an epoch's draws are decoded in batches at the epoch start (a CPU budget option, see
    # decisions.md).
    generation_timing: str = setting(
        "step", help="step: decode in the step that draws it; epoch: decode an epoch's draws in batches at its start"
    )
    max_new_tokens: int = setting(512, help="tokens to generate at most per hard negative")
    max_length: int = setting(
        2048, help="longest training sequence in tokens (a longer one keeps its end, which holds the completion)"
    )
    # optimisation
    epochs: int = setting(10, help="training epochs")
    micro_batch_size: int = setting(16, help="instances per forward/backward pass on each process")
    gradient_accumulation: int = setting(1, help="micro-batches per optimiser step")
    learning_rate: float = setting(5e-5, help="AdamW peak learning rate")
    warmup_steps: int = setting(78, help="linear warmup steps, then linear decay to 0")
    weight_decay: float = setting(0.01, help="AdamW weight decay")
    max_grad_norm: float = setting(1.0, help="gradient clipping norm (0: off)")
    eval_steps: int = setting(39, help="evaluate (and keep the best checkpoint) every N optimiser steps")
    save_steps: int = setting(39, help="write the resumable checkpoint every N optimiser steps")
    max_eval_docs: int = setting(0, help="calibration documents in each evaluation (0: all)")
    validation_layer_docs: int = setting(0, help="calibration documents for the validation SDM layer (0: all)")
    # N > 0: at a high learning rate h leaves the epoch-start layer's range within a few steps (docs/decisions.md).
    train_layer_refit_steps: int = setting(
        0,
        help="SDM loss only: also refit the training-set SDM layer every N optimiser steps within an epoch "
        "(0: once per epoch, the paper's recipe)",
    )
    seed: int = setting(0, help="seed of every draw, shuffle and initialisation")
    # SDM layers inside fine-tuning (SDM_SPEC §3.5)
    sdm: SDMConfig = group(
        SDMConfig,
        {
            "sdm_epochs": ("epochs", "epochs of each SDM layer fitted during training"),
            "sdm_exemplar_dim": ("exemplar_dim", "exemplar dimension M of those SDM layers"),
            "sdm_batch_size": ("batch_size", "mini-batch size of those SDM layers"),
            "sdm_learning_rate": ("learning_rate", "Adam learning rate of those SDM layers"),
            "alpha": ("alpha", "alpha of the SDM layers' HIGH-RELIABILITY region"),
        },
    )
    # embedding / generation batch sizes (no-grad passes)
    embed_batch_size: int = setting(16, help="instances per no-grad hidden-state pass")
    generate_batch_size: int = setting(16, help="prompts per batched greedy generation")
    recipe_sequence_end: str = setting(
        "template", help="where h's sequence ends: template (reference code) or verified (the paper: at <verified>)"
    )
    progress: bool = setting(True, help="show progress bars")

    def __post_init__(self) -> None:
        self._check_training()
        self._check_task()

    def _check_training(self) -> None:
        """Counts, rates, loss, precision and the model source."""
        positive_ints = (
            "epochs",
            "micro_batch_size",
            "gradient_accumulation",
            "eval_steps",
            "save_steps",
            "embed_batch_size",
            "generate_batch_size",
            "max_new_tokens",
            "max_length",
            "lora_r",
            "lora_alpha",
        )
        for name in positive_ints:
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        for name in (
            "max_train_docs",
            "max_calibration_docs",
            "max_eval_docs",
            "warmup_steps",
            "trainable_last_layers",
            "generate_from_epoch",
            "validation_layer_docs",
            "train_layer_refit_steps",
        ):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("gamma_positive", "gamma_generate"):
            if not 0.0 <= float(getattr(self, name)) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
        if self.loss not in ("sdm", "ce"):
            raise ValueError(f"loss must be 'sdm' or 'ce', got {self.loss!r}")
        if self.loss == "ce" and self.train_layer_refit_steps:
            raise ValueError(
                f"train_layer_refit_steps {self.train_layer_refit_steps} refits the SDM loss's training layer, and "
                "the CE loss fits none: pass --train-layer-refit-steps 0 (or unset SDM_TRAIN_LAYER_REFIT_STEPS) with "
                "--loss ce"
            )
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
        if self.mixed_precision not in ("no", "bf16"):
            raise ValueError(
                "mixed_precision must be 'no' or 'bf16' (--mixed-precision / SDM_MIXED_PRECISION), got "
                f"{self.mixed_precision!r}"
            )
        if self.mixed_precision == "bf16" and self.dtype != "float32":
            raise ValueError(
                "mixed_precision bf16 (the smollm2-cpu preset sets it) autocasts over float32 weights; with dtype "
                "bfloat16 pass --mixed-precision no (or SDM_MIXED_PRECISION=no)"
            )
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate!r}")
        # The SDM layers' settings (sdm_*, alpha) are validated by SDMConfig itself.
        if not isinstance(self.model, dict) or "kind" not in self.model:
            raise ValueError("model must be a model source such as {'kind': 'smollm2'} or {'kind': 'hf', 'path': ...}")

    def _check_task(self) -> None:
        """The built-in task's settings (used when no --train / --calibration files are given)."""
        if not 1 <= self.task_min_words <= self.task_max_words:
            raise ValueError(
                f"need 1 <= task_min_words <= task_max_words, got {self.task_min_words}, {self.task_max_words}"
            )
        if self.task not in ("word_order", "arithmetic"):
            raise ValueError(
                "task must be 'word_order' or 'arithmetic' (or give your own --train and --calibration files), got "
                f"{self.task!r}"
            )
        if not 1 <= self.task_min_digits <= self.task_max_digits:
            raise ValueError(
                f"need 1 <= task_min_digits <= task_max_digits, got {self.task_min_digits}, {self.task_max_digits}"
            )
        if not self.task_operations or set(self.task_operations) - {"+", "-", "*"}:
            raise ValueError(
                f"task_operations must be a non-empty subset of +,-,*, got {','.join(self.task_operations)!r}"
            )
        if self.generation_timing not in ("step", "epoch"):
            raise ValueError(f"generation_timing must be 'step' or 'epoch', got {self.generation_timing!r}")
        if self.recipe_sequence_end not in ("template", "verified"):
            raise ValueError(f"recipe_sequence_end must be 'template' or 'verified', got {self.recipe_sequence_end!r}")

    def to_dict(self) -> dict:
        """The flat settings, named as their flags (what config.json records)."""
        return flatten(self)


# The paper's configuration (SDM_SPEC §3.8) for Phi-3.5-mini-instruct on GPUs.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {
        "model": {"kind": "hf", "path": "microsoft/Phi-3.5-mini-instruct"},
        "dtype": "bfloat16",
        "gradient_checkpointing": True,
        "epochs": 10,
        "micro_batch_size": 16,
        "gradient_accumulation": 1,
        "learning_rate": 5e-5,
        "warmup_steps": 78,
        "eval_steps": 39,
        "save_steps": 39,
        "gamma_generate": 0.5,
        "max_new_tokens": 512,
    },
    # SmolLM2-135M-Instruct on 2 CPU cores within ~45 minutes: a small slice of the data, the last blocks trained,
    # short generations (word-ordering answers are < 100 tokens) and shorter SDM-layer fits.
    "smollm2-cpu": {
        "model": {"kind": "smollm2"},
        "dtype": "float32",
        # bfloat16 autocast in the fine-tuning loop (float32 weights; calibration and serving stay float32): a step
        # is ~3x faster on CPUs with AVX512-BF16 or AMX, which puts 864 documents within the 45-minute budget.
        "mixed_precision": "bf16",
        # Sentences of 5-14 words (the paper: 5-60): a 135M model on 2 cores learns the short task in the budget,
        # and generations are ~4x shorter to decode. See docs/decisions.md.
        "task_max_words": 14,
        # 864 training documents: with 288 the model decoded ~39 % of calibration prompts and its head had no
        # region at any alpha; with 864 it decodes ~55 % and has one at 0.95 (docs/decisions.md).
        "max_train_docs": 864,
        "max_calibration_docs": 256,
        # With the 256 calibration documents, 2,192 for the final head: 256 certify it, the other 1,936 are split
        # between its support and its calibration half (docs/decisions.md, "What the final head is calibrated on").
        "task_holdout_docs": 1936,
        "max_eval_docs": 32,
        "validation_layer_docs": 80,
        # LoRA r = 8 on every block: after 45 steps it decoded 37.5 % of test prompts correctly, as full fine-tuning
        # did, where LoRA on the last 8 blocks reached ~14 %; the adapter (~10 MB) keeps the bundle committable.
        "lora": True,
        "lora_r": 8,
        "lora_alpha": 16,
        "trainable_last_layers": 0,
        "epochs": 2,
        "micro_batch_size": 8,
        "gradient_accumulation": 1,
        "learning_rate": 1e-3,
        "warmup_steps": 6,
        "eval_steps": 36,
        "save_steps": 12,
        "gamma_generate": 0.25,
        # One batched decode of the epoch's hard-negative prompts at its start instead of ~1 prompt decoded alone
        # in every step.
        "generation_timing": "epoch",
        "max_new_tokens": 48,
        "max_length": 256,
        # The paper's h ends at <verified>: h is then a prefix of the training sequence, so b comes from the
        # training forward pass itself instead of a second pass (about a fifth of a step on this CPU).
        "recipe_sequence_end": "verified",
        # Small supports (~150 documents) give few Adam steps per epoch: a larger rate than the paper's 1e-5
        # over 2,500 documents (the loss was still falling at epoch 60 with 1e-4).
        "sdm_epochs": 200,
        "sdm_learning_rate": 3e-4,
        "embed_batch_size": 16,
        "generate_batch_size": 16,
    },
    # A tiny random Llama with the SmolLM2 tokenizer: seconds; for tests and smoke runs.
    "tiny": {
        "model": {"kind": "tiny", "seed": 0},
        "dtype": "float32",
        "max_train_docs": 16,
        "max_calibration_docs": 16,
        "max_eval_docs": 4,
        "epochs": 2,
        "micro_batch_size": 4,
        "gradient_accumulation": 2,
        "learning_rate": 1e-3,
        "warmup_steps": 1,
        "eval_steps": 3,
        "save_steps": 1,
        "gamma_generate": 1.0,
        "max_new_tokens": 12,
        "max_length": 256,
        "sdm_epochs": 3,
        "sdm_exemplar_dim": 32,
        "sdm_learning_rate": 1e-3,
        "embed_batch_size": 8,
        "generate_batch_size": 8,
        "progress": False,
    },
}

# The committed default bundle's fine-tuning: the smollm2-cpu recipe on 4x the training documents, which lifted
# greedy accuracy on wiki test prompts from 0.49 to 0.73 (docs/results.md, "More training documents"). 864 steps: ~7
# minutes on one H200 shared with four other fine-tunes; the larger batches only speed up decoding and embedding.
PRESETS["smollm2-gpu"] = {
    **PRESETS["smollm2-cpu"],
    "max_train_docs": 3456,
    "generate_batch_size": 64,
    "embed_batch_size": 64,
}

# The multi-digit arithmetic task (training/arithmetic.py): the same model budgets, answers checked by exact value.
# Built into OUTPUT_DIR/data when no --train/--calibration are given; calibrate and evaluate have presets of the same
# names that select the arithmetic correctness function.
PRESETS["arithmetic-tiny"] = {
    **PRESETS["tiny"],
    "task": "arithmetic",
    "correctness": "arithmetic",
    "task_max_digits": 3,
}
PRESETS["arithmetic-cpu"] = {
    **{k: v for k, v in PRESETS["smollm2-cpu"].items() if k != "task_max_words"},
    "task": "arithmetic",
    "correctness": "arithmetic",
    # 2-3-digit operands, all three operations: a 135M model gets sums and differences right more often than
    # products, which gives the head something to separate.
    "task_min_digits": 2,
    "task_max_digits": 3,
    # "<answer>-99999</answer>\n<verified>Yes</verified>" is 20 tokens in SmolLM2's tokenizer (word ordering's: ~40).
    "max_new_tokens": 32,
}


FINETUNE = CommandLine(FinetuneConfig, prog="python -m training.finetune", presets=PRESETS)
