"""``python -m training.finetune``: fine-tune a decoder-only LM into an SDM LM (or the CE baseline).

    python -m training.finetune --preset tiny --output-dir runs/tiny
    python -m training.finetune --preset smollm2-cpu --output-dir runs/smollm2 [--loss ce]
    python -m training.finetune --preset arithmetic-cpu --output-dir runs/arith
    accelerate launch -m training.finetune --preset paper --train data/train.jsonl --calibration data/calibration.jsonl

Without --train/--calibration the task named by --task is built into OUTPUT_DIR/data: word ordering from the shipped
corpora (the default), or multi-digit arithmetic from the seed (``--preset arithmetic-tiny`` / ``arithmetic-cpu``).
Outputs: OUTPUT_DIR/{config.json, metrics.jsonl, train.log, best/, final/, checkpoint/}.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from sdm_core.lm.models import load_model, load_tokenizer
from training.config import FinetuneConfig, build_parser, config_from_args
from training.correctness import get_correctness
from training.records import DataError, Record, load_records
from training.state import TrainerCallback, TrainResult

__all__ = ["prepare_model", "load_task", "run", "main"]

log = logging.getLogger("training")


def prepare_model(config: FinetuneConfig):
    """The model and tokenizer for ``config``: LoRA adapters, or only the last N blocks trainable, or all."""
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[config.dtype]
    tokenizer = load_tokenizer(config.model)
    model = load_model(config.model, dtype=dtype)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    if config.lora:
        from peft import LoraConfig, get_peft_model

        n_layers = len(model.get_decoder().layers)
        if config.trainable_last_layers > n_layers:
            raise ValueError(
                f"trainable_last_layers={config.trainable_last_layers} but the model has {n_layers} blocks"
            )
        last = list(range(n_layers - config.trainable_last_layers, n_layers)) if config.trainable_last_layers else None
        lora = LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=0.0,
            target_modules=list(config.lora_targets),
            task_type="CAUSAL_LM",
            layers_to_transform=last,
            layers_pattern="layers" if last else None,
        )
        model = get_peft_model(model, lora)
    elif config.trainable_last_layers:
        layers = model.get_decoder().layers
        if config.trainable_last_layers > len(layers):
            raise ValueError(
                f"trainable_last_layers={config.trainable_last_layers} but the model has {len(layers)} blocks"
            )
        for p in model.parameters():
            p.requires_grad_(False)
        for block in layers[-config.trainable_last_layers :]:
            for p in block.parameters():
                p.requires_grad_(True)
        for p in model.get_decoder().norm.parameters():
            p.requires_grad_(True)
    return model, tokenizer


def load_task(config: FinetuneConfig) -> tuple[list[Record], list[Record]]:
    """The train and calibration records (building the word-ordering task when no files are given)."""
    train_path, cal_path = config.train, config.calibration
    if not train_path or not cal_path:
        if train_path or cal_path:
            raise ValueError(f"give both --train and --calibration, or neither (to build the {config.task} task)")
        data_dir = Path(config.output_dir) / "data"
        manifest = data_dir / "manifest.json"
        if manifest.is_file():
            built = json.loads(manifest.read_text()).get("task")
            if built != config.task:
                raise ValueError(
                    f"{data_dir} holds the {built} task but --task is {config.task}; use another --output-dir"
                )
        elif config.task == "arithmetic":
            from training.arithmetic import ArithmeticConfig, build_arithmetic

            n_train = config.max_train_docs or 5000
            n_cal = config.max_calibration_docs or 2000
            build_arithmetic(
                data_dir,
                ArithmeticConfig(
                    seed=config.seed,
                    train=n_train,
                    calibration=n_cal,
                    test=max(200, min(1000, n_cal)),
                    holdout=config.task_holdout_docs,
                    shift=200,
                    min_digits=config.task_min_digits,
                    max_digits=config.task_max_digits,
                    operations=tuple(config.task_operations),
                    quiet=True,
                ),
            )
        else:
            from training.data import WordOrderConfig, build_word_order

            n_train = config.max_train_docs or 5000
            n_cal = config.max_calibration_docs or 5000
            build_word_order(
                data_dir,
                WordOrderConfig(
                    seed=config.seed,
                    train=n_train,
                    calibration=n_cal,
                    test=max(200, min(2000, n_cal)),
                    holdout=config.task_holdout_docs,
                    min_words=config.task_min_words,
                    max_words=config.task_max_words,
                    quiet=True,
                ),
            )
        train_path, cal_path = str(data_dir / "train.jsonl"), str(data_dir / "calibration.jsonl")
    train = load_records(train_path)
    cal = load_records(cal_path)
    if config.max_train_docs:
        train = train[: config.max_train_docs]
    if config.max_calibration_docs:
        cal = cal[: config.max_calibration_docs]
    overlap = {r.id for r in train} & {r.id for r in cal}
    if overlap:
        raise DataError(f"train and calibration share ids, e.g. {sorted(overlap)[:3]}; the splits must be disjoint")
    return train, cal


def _setup_logging(output_dir: Path) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(output_dir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger = logging.getLogger("training")
    logger.setLevel(logging.INFO)
    if not any(isinstance(h, logging.FileHandler) and h.baseFilename == handler.baseFilename for h in logger.handlers):
        logger.addHandler(handler)


def run(config: FinetuneConfig, resume: bool = False, callbacks: Sequence[TrainerCallback] = ()) -> TrainResult:
    """Fine-tune; under ``accelerate launch`` / ``torchrun`` every rank calls this, and rank 0 writes the outputs.
    ``callbacks`` are told after every checkpoint (:class:`training.state.TrainerCallback`)."""
    from accelerate import Accelerator

    from training.trainer import SDMTrainer

    get_correctness(config.correctness)  # a bad --correctness fails before any data or model loads
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    if accelerator.is_main_process:
        _setup_logging(Path(config.output_dir))
    with accelerator.main_process_first():  # rank 0 builds the task's data folder; the others then read it
        train, cal = load_task(config)
    model, tokenizer = prepare_model(config)
    trainer = SDMTrainer(config, model, tokenizer, train, cal, accelerator=accelerator, callbacks=callbacks)
    return trainer.train(resume=resume)


def main(argv: Sequence[str] | None = None, callbacks: Sequence[TrainerCallback] = ()) -> int:
    parser = build_parser(description=__doc__)
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
        result = run(config, resume=args.resume, callbacks=callbacks)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return 0
    print(
        json.dumps(
            {
                "output_dir": str(result.output_dir),
                "best": str(result.best_dir),
                "best_eval_loss": result.best_eval_loss,
                "best_step": result.best_step,
                "steps": result.steps,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
