"""Training, a library the stages hand their pieces to (it never sees a run context):

- `trainer.py`: `train(model, optimizer, batches, loss, cfg, ...)`, the one loop for teacher,
  student and baseline; `make_optimizer` (AdamW on the schedule, fp32 masters below float32);
- `step.py`: one compiled optimizer step (accumulation, clipping, masters); `loss.py`: the
  per-batch loss through the fused kernel; `recompute.py`: block checkpointing;
- `checkpoint.py`: exact resume; `log.py`: the callback and metrics.jsonl + progress bar;
- `onpolicy.py`, `sampler.py`: on-policy batches (the student samples, a teacher it is handed
  scores); `distributed.py`: data parallelism with `mx.distributed` (`launched.py`: a rank's
  exit code, reported to `run --hosts`); `bench.py`: `bench step`.
"""
