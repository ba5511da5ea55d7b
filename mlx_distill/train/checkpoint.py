"""Checkpoints of one training run: `<folder>/step-NNNNNN/` holds the trainable weights (the fp32
masters when there are any), the optimizer state and the batch source's position, so a killed
run resumes at the exact batch it stopped at. Each records the fingerprint of what it was
trained from; a checkpoint of other inputs is discarded, never resumed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from mlx_distill.files import atomic_dir
from mlx_distill.train import distributed
from mlx_distill.train.step import master_to_model

KEEP_CHECKPOINTS = 2


class Checkpoints:
    """The checkpoint folder of one run, for `trainer.train`.

    folder: e.g. runs/NAME/checkpoints/distill. fingerprint: what the run trains from (the
    stage's fingerprint); a checkpoint with another is deleted on `resume`.
    """

    def __init__(self, folder: str | Path, fingerprint: str) -> None:
        self.folder = Path(folder)
        self.fingerprint = fingerprint

    def latest(self) -> Path | None:
        found = sorted(p for p in self.folder.glob("step-*") if (p / "state.json").exists())
        return found[-1] if found else None

    def resume(self, model, optimizer, batches, master: dict | None = None) -> int:
        """Restore the newest matching checkpoint; returns its step (0: none). In a group rank 0
        picks the checkpoint and every rank restores that one."""
        ckpt = self.latest() if distributed.is_main() else None
        if ckpt is not None:
            state = json.loads((ckpt / "state.json").read_text())
            if state.get("fingerprint") != self.fingerprint:
                shutil.rmtree(self.folder, ignore_errors=True)
                ckpt = None
        ckpt = distributed.broadcast(str(ckpt) if ckpt else None)
        if ckpt is None:
            return 0
        return _restore(Path(ckpt), model, optimizer, batches, master)

    def save(self, step: int, model, optimizer, batches, master: dict | None = None) -> None:
        """Write step-NNNNNN atomically; keep the newest KEEP_CHECKPOINTS."""
        with atomic_dir(self.folder / f"step-{step:06d}") as tmp:
            mx.save_safetensors(str(tmp / "model.safetensors"), _trained_weights(model, master))
            optimizer_state = dict(tree_flatten(optimizer.state))
            mx.save_safetensors(str(tmp / "optimizer.safetensors"), optimizer_state)
            state = {"step": step, "fingerprint": self.fingerprint, "loader": batches.state_dict()}
            (tmp / "state.json").write_text(json.dumps(state))
        for old in sorted(self.folder.glob("step-*"))[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old, ignore_errors=True)


def _trained_weights(model, master) -> dict:
    """What a checkpoint must hold to resume: the trainable weights (fp32 masters if any)."""
    return dict(tree_flatten(master["params"] if master else model.trainable_parameters()))


def _restore(ckpt: Path, model, optimizer, batches, master=None) -> int:
    state = json.loads((ckpt / "state.json").read_text())
    weights = mx.load(str(ckpt / "model.safetensors"))
    if master is not None:
        master["params"] = tree_unflatten(list(weights.items()))
        master_to_model(model, master)
    else:  # frozen (adapter-base) weights are not in the checkpoint: they never change
        model.load_weights(list(weights.items()), strict=False)
    optimizer.state = tree_unflatten(list(mx.load(str(ckpt / "optimizer.safetensors")).items()))
    batches.load_state_dict(state["loader"])
    return int(state["step"])
