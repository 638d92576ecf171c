"""``python -m training.finetune`` that dies as kill -9 would (exit status 137, no clean-up) right after the
checkpoint of a given step: the crash of the resume tests.

    python tests/crashing_finetune.py STEP [training.finetune flags]
"""

from __future__ import annotations

import os
import sys

from training.finetune import main

CRASH_STATUS = 137  # what a shell reports for a process killed by SIGKILL (128 + 9)


class CrashAfterCheckpoint:
    """A trainer callback: once the checkpoint of ``step`` (or a later one) is complete, every rank exits at once."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_checkpoint(self, trainer) -> None:
        if trainer.state.step >= self.step:
            trainer.accelerator.wait_for_everyone()  # rank 0 may still be writing; a rank's exit ends the launch
            os._exit(CRASH_STATUS)


if __name__ == "__main__":
    sys.exit(main(sys.argv[2:], callbacks=[CrashAfterCheckpoint(int(sys.argv[1]))]))
