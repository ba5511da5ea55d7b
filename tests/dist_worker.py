"""One rank of the distributed tests (tests/test_distributed.py starts it with MLX_RANK and
MLX_HOSTFILE, or alone as the one-process reference).

    python tests/dist_worker.py train OUT STEPS [STOP_AT]   tiny student, KD loss on a cache
    python tests/dist_worker.py cache OUT                   the teacher cache, sharded by rank

`train` writes OUT/metrics.jsonl and OUT/final.safetensors (rank 0); STOP_AT makes every rank die
(os._exit, as a kill would) when that batch is requested. `cache` writes OUT/cache.
"""

import os
import sys
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from tiny import counting_examples, tiny_model, tiny_student, tiny_tokenizer, train_run

from mlx_distill.cache import build_token_cache, open_cache
from mlx_distill.cache.loader import Loader
from mlx_distill.cache.writer import merge_rank_manifests
from mlx_distill.recipe import LossConfig, TrainConfig
from mlx_distill.train import distributed as dist

VOCAB = 23


def examples(n=48, seed=0):
    """Sequences of 5-15 tokens (next = previous + 1), so ranks hold different token counts."""
    return counting_examples(n, VOCAB, seed, 5, 16)


def make_cache(out: Path):
    """The cache of `examples()` scored by a tiny local teacher, each rank its shards."""
    from mlx_distill.teachers.local import LocalTeacher

    teacher = LocalTeacher((tiny_model(VOCAB, seed=1)[0], tiny_tokenizer(VOCAB)), name="tiny")
    cache = out / "cache"
    build_token_cache(
        teacher,
        examples(),
        cache,
        k=4,
        batch_size=5,
        shard_rows=7,
        progress=False,
        rank=dist.rank(),
        world=dist.world(),
    )
    if dist.world() > 1:
        dist.barrier()
        if dist.is_main():
            merge_rank_manifests(cache)
        dist.barrier()


class _Stopping(Loader):
    def __init__(self, *args, stop_at, **kwargs):
        super().__init__(*args, **kwargs)
        self.stop_at, self.count = stop_at, 0

    def __next__(self):
        self.count += 1
        if self.count == self.stop_at:
            os._exit(9)
        return super().__next__()


def main():
    dist.init()
    mode, out = sys.argv[1], Path(sys.argv[2])
    if mode == "cache":
        make_cache(out)
        return
    steps = int(sys.argv[3])
    stop_at = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    source = open_cache(out.parent / "shared" / "cache")
    kwargs = dict(batch_size=8, seq_len=14, seed=5, rank=dist.rank(), world=dist.world())
    loader = _Stopping(source, stop_at=stop_at, **kwargs) if stop_at else Loader(source, **kwargs)
    student, _ = tiny_student(VOCAB, 3)
    cfg = TrainConfig(steps=steps, batch_size=8, lr=3e-3, warmup=2, log_every=1, checkpoint_every=2)
    loss_cfg = LossConfig(kind="forward_kl", kd_weight=0.5, temperature=1.0)
    train_run(
        out,
        student,
        loader,
        cfg,
        loss_cfg,
        "distill",
        metrics=out / "metrics.jsonl",
        checkpoints=out / "ckpt",
    )
    loader.close()
    if dist.is_main():
        mx.save_safetensors(
            str(out / "final.safetensors"), dict(tree_flatten(student.parameters()))
        )


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
