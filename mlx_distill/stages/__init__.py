"""The stage bodies, in flow order: what the runner (`mlx_distill.run`) calls, one function per
stage, each handed the stage's `Context` and returning the summary its `stage.json` records.

- `teach.py`: tokenizer, teacher and cache (the teacher kind's: `kinds.py`, `local.py`,
  `gemini.py`);
- `distill.py`: the KD student (and `distill.compare`'s runs) and the baseline;
- `eval.py`, `report.py`: every model of the run evaluated, then report.md;
- `inputs.py`: what the bodies build from a run context (tokenizer, examples, loaders, the
  validator, one training run) for the libraries below.

Bodies call the libraries (`text`, `teachers`, `cache`, `models`, `kernels`, `train`,
`evaluate`, `report`); nothing below calls back up.
"""

from mlx_distill.stages.distill import stage_baseline, stage_distill
from mlx_distill.stages.eval import stage_eval
from mlx_distill.stages.report import stage_report
from mlx_distill.stages.teach import stage_cache, stage_teacher, stage_tokenizer

BODIES = {
    "tokenizer": stage_tokenizer,
    "teacher": stage_teacher,
    "cache": stage_cache,
    "distill": stage_distill,
    "baseline": stage_baseline,
    "eval": stage_eval,
    "report": stage_report,
}
