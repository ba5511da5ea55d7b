"""What a training run reports as it goes: `TrainCallback` is the trainer's view of it, `RunLog`
the one the stages use (metrics.jsonl lines and a progress bar).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from mlx_distill.train import distributed


class TrainCallback:
    """Hooks `trainer.train` calls; each does nothing here. `start` is the step the run resumes
    from (0: a fresh run), records are {"step", ...} dicts as `train` documents them."""

    def on_start(self, start: int, total: int) -> None: ...

    def on_step(self, step: int) -> None: ...

    def on_report(self, record: dict, split: bool) -> None: ...

    def on_valid(self, record: dict) -> None: ...

    def on_end(self) -> None: ...


class RunLog(TrainCallback):
    """Appends the run's records to `metrics_path` as {"run": name, ...} lines and shows a
    progress bar (at terminal line `bar_position`). In a distributed group only rank 0 writes
    and shows anything.

    On start it drops this run's lines past the step it resumes from, keeping every other
    run's: a side process may be appending another run's lines to the same file.
    """

    def __init__(
        self, metrics_path: str | Path, run: str, *, progress: bool = True, bar_position: int = 0
    ) -> None:
        self.path = Path(metrics_path)
        self.run = run
        self.progress = progress
        self.bar_position = bar_position
        self.main = distributed.is_main()
        self._file = None
        self._bar = None

    def on_start(self, start: int, total: int) -> None:
        from tqdm import tqdm

        if self.main and self.path.exists():
            lines = self.path.read_text().splitlines()
            kept = []
            for line in lines:
                record = json.loads(line)
                if record["run"] != self.run or record["step"] <= start:
                    kept.append(line)
            # Rewritten in place (not replaced): a side process appending to this file keeps
            # writing to it; and only when there is something to drop.
            if len(kept) < len(lines):
                self.path.write_text("".join(line + "\n" for line in kept))
        self._file = self.path.open("a") if self.main else open(os.devnull, "w")  # noqa: SIM115
        self._bar = tqdm(
            total=total,
            initial=start,
            desc=self.run,
            unit="step",
            disable=not self.progress or not self.main,
            leave=True,
            position=self.bar_position,
        )

    def on_step(self, step: int) -> None:
        self._bar.update(1)

    def _write(self, record: dict) -> None:
        self._file.write(json.dumps({"run": self.run, **record}) + "\n")
        self._file.flush()

    def on_report(self, record: dict, split: bool) -> None:
        self._write(record)
        self._bar.set_postfix(_postfix(record, split))

    def on_valid(self, record: dict) -> None:
        self._write(record)

    def on_end(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._bar is not None:
            self._bar.close()


def _postfix(record: dict, split: bool) -> dict:
    """The progress bar's loss, and with an on-policy source generation, teacher scoring and
    the training step apart (samples/s and tokens/s of each)."""
    postfix = {"loss": f"{record['loss']:.3f}"}
    if split:
        for part in ("gen", "score", "train"):
            samples, tokens = record[f"{part}_samples_per_s"], record[f"{part}_tokens_per_s"]
            postfix[part] = f"{samples:.1f}samp/s {tokens:.0f}tok/s"
    return postfix
