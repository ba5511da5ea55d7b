"""The runner: what the CLI calls to run a recipe, and nothing below it calls.

- `table.py`: the one table of stages (sections, upstream, outputs, kept entries, groups, ranks);
- `fingerprints.py`: stage fingerprints and why a stage is stale, in words;
- `runner.py`: `run_stages`, each stage skipped, resumed or started over, its `stage.json`;
- `preflight.py`: every input checked before any stage writes (and what a group can run);
- `lock.py`, `side.py`: one process per run directory; the baseline's side process;
- `launch.py`: `--hosts`, one rank per host through `mlx.launch`;
- `commands.py`: `eval PATH` and `cache repair PATH` on a finished run.

The runner calls the stage bodies (`mlx_distill.stages`); the bodies call the libraries.
"""
