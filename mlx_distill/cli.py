"""The `mlx-distill` command line. One small function per command; heavy imports inside them."""

from __future__ import annotations

import json
import sys
import traceback
import warnings

import click

from mlx_distill.errors import BadInput, StageIncomplete


def _emit(obj: dict, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(obj, indent=2, default=str))
    else:
        for key, value in obj.items():
            shown = json.dumps(value, default=str) if isinstance(value, (dict, list)) else value
            click.echo(f"{key}: {shown}")


def _run(
    recipe_path,
    stages,
    group,
    *,
    overrides,
    force,
    dry_run,
    retry_failed,
    as_json,
    no_progress,
    no_baseline,
    jobs,
    bar_position,
    hosts,
):
    """Shared by run/teach/train; `group`: run only those of `stages` this recipe has."""
    progress = not no_progress
    from mlx_distill.recipe import load_recipe

    if no_baseline:
        overrides = (*overrides, "baseline=false")
    recipe = load_recipe(recipe_path, overrides)
    if group:  # teach/train: the group's stages that this recipe has
        stages = [s for s in stages if s in recipe.stages]
        if not stages:
            raise BadInput(f"recipe {recipe_path} has none of the stages this command runs")
    from mlx_distill.run import launch
    from mlx_distill.run.preflight import check_group, check_inputs

    selected = list(stages) or [s for s in recipe.stages]
    if dry_run:  # the inputs the run would read are checked; nothing is written
        check_inputs(recipe, [s for s in recipe.stages if s in selected])
        click.echo(recipe.to_yaml(), nl=False)
        return
    if hosts is not None:  # start the ranks; they run this same command without --hosts
        world = len(launch.read_hostfile(hosts)["hosts"])
        check_group(recipe, selected, world)
        sys.exit(launch.launch(hosts, _without_hosts(sys.argv[1:])))
    from mlx_distill.train import distributed

    distributed.init()  # a launcher started this process: join its group
    if distributed.world() > 1:  # every rank checks; rank 0 alone says what is wrong
        distributed.agree(lambda: check_group(recipe, selected, distributed.world()))
        jobs = 1  # the baseline trains after the student on the same ranks, not beside it
        progress = progress and distributed.is_main()
    from mlx_distill.context import Context
    from mlx_distill.run.runner import run_stages

    ctx = Context(
        recipe,
        recipe.run_dir,
        progress=progress,
        retry_failed=retry_failed,
        jobs=jobs,
        bar_position=bar_position,
        recipe_path=str(recipe_path),
        overrides=tuple(overrides),
    )
    if not distributed.is_main():
        ctx.log = lambda msg: None  # rank 0 logs the stages
    outcome = run_stages(ctx, only=list(stages) or None, force=force)
    if not distributed.is_main():
        return  # rank 0 prints the summary
    summary = {"run_dir": str(recipe.run_dir), "stages": outcome}
    if (recipe.run_dir / "report.md").exists() and "report" in outcome:
        summary["report"] = str(recipe.run_dir / "report.md")
    if as_json:
        _emit(summary, True)
    elif "report" in outcome:
        click.echo((recipe.run_dir / "report.md").read_text())


def _run_options(f):
    f = click.option(
        "--set",
        "overrides",
        multiple=True,
        metavar="KEY=VALUE",
        help="Override a recipe key, e.g. --set train.steps=200.",
    )(f)
    f = click.option("--force", is_flag=True, help="Rerun stages even when up to date.")(f)
    f = click.option(
        "--dry-run",
        is_flag=True,
        help="Check the inputs (data, templates, models), print the resolved recipe and exit.",
    )(f)
    f = click.option(
        "--no-baseline",
        is_flag=True,
        help="Leave out the baseline stage (recipe key baseline: false).",
    )(f)
    f = click.option("--retry-failed", is_flag=True, help="Retry failed teacher requests.")(f)
    f = click.option("--json", "as_json", is_flag=True, help="Print one JSON summary on stdout.")(f)
    f = click.option("--no-progress", is_flag=True, help="Hide progress bars.")(f)
    f = click.option(
        "--jobs",
        type=click.IntRange(min=1),
        default=2,
        show_default=True,
        help="2: train the baseline in a second process beside the KD student; 1: one by one.",
    )(f)
    f = click.option("--bar-position", type=int, default=0, hidden=True)(f)
    f = click.option(
        "--hosts",
        type=click.Path(dir_okay=False),
        default=None,
        metavar="FILE",
        help="Run data-parallel on these hosts (an mlx.launch hostfile) via mlx.launch.",
    )(f)
    return f


def _without_hosts(argv: list[str]) -> list[str]:
    """The command line minus its --hosts option (what every rank runs)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--hosts":
            skip = True
        elif not arg.startswith("--hosts="):
            out.append(arg)
    return out


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@click.version_option(package_name="mlx-distill")
@click.pass_context
def cli(ctx, debug):
    """Knowledge distillation on Apple silicon with MLX."""
    ctx.obj = {"debug": debug}


@cli.command()
@click.argument("recipe", type=click.Path())
@click.option("--stage", "stages", multiple=True, help="Run only this stage (repeatable).")
@_run_options
def run(recipe, stages, **options):
    """Run a recipe's stages in order, skipping those already up to date."""
    _run(recipe, stages, False, **options)


@cli.command()
@click.argument("recipe", type=click.Path())
@_run_options
def teach(recipe, **options):
    """Run the tokenizer, teacher and cache stages."""
    from mlx_distill.run.table import group

    _run(recipe, group("teach"), True, **options)


@cli.command()
@click.argument("recipe", type=click.Path())
@_run_options
def train(recipe, **options):
    """Run the distill and baseline stages (the teacher cache must be up to date)."""
    from mlx_distill.run.table import group

    _run(recipe, group("train"), True, **options)


@cli.command()
@click.argument("recipe", type=click.Path())
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a key.")
@click.option("--json", "as_json", is_flag=True)
@click.option("--time", "timed", is_flag=True, help="Also estimate wall time (timed probes).")
def plan(recipe, overrides, as_json, timed):
    """Predicted peak memory (and wall time) of each stage (exit 2 if it will not fit)."""
    from mlx_distill.hub import resolve_configs
    from mlx_distill.plan import advice, format_table, plan_recipe
    from mlx_distill.recipe import load_recipe

    resolved = load_recipe(recipe, overrides)
    resolve_configs(resolved)  # Hub ids: their config.json and tokenizer, not their weights
    result = plan_recipe(resolved)
    if timed:
        from mlx_distill.plan_time import add_times

        add_times(resolved, result)
    if as_json:
        _emit(result, True)
    else:
        click.echo(format_table(result))
    if not result["fits"]:
        raise BadInput(f"predicted not to fit; try {advice(resolved, result)}")


@cli.command("eval")
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True)
@click.option("--no-progress", is_flag=True)
@click.option(
    "--hosts",
    type=click.Path(dir_okay=False),
    default=None,
    metavar="FILE",
    help="Split the problems across these hosts (an mlx.launch hostfile) via mlx.launch.",
)
def eval_(path, as_json, no_progress, hosts):
    """Re-evaluate a run directory (runs/NAME) and rewrite its report."""
    from pathlib import Path

    from mlx_distill.run.commands import evaluate_in_place, run_context

    if hosts is not None:
        from mlx_distill.run import launch

        launch.read_hostfile(hosts)
        run_context(Path(path))  # a run directory, checked before any rank starts
        sys.exit(launch.launch(hosts, _without_hosts(sys.argv[1:])))
    from mlx_distill.train import distributed

    distributed.init()  # a launcher started this process: join its group
    results = evaluate_in_place(Path(path), progress=not no_progress)
    if distributed.is_main():
        _emit(results, as_json)


@cli.command()
@click.argument("path", type=click.Path())
@click.option("--teacher", type=click.Path(), help="Answer with this model too, side by side.")
@click.option("--max-tokens", default=256, show_default=True)
@click.option("--temp", default=0.0, show_default=True, help="Sampling temperature (0: greedy).")
@click.option("--system", default=None, help="System prompt.")
def chat(path, teacher, max_tokens, temp, system):
    """Chat with a model folder (streaming; /reset, /quit; reads a pipe too)."""
    from pathlib import Path

    from mlx_distill.chat import chat_loop

    for option, value in (("PATH", path), ("--teacher", teacher)):
        if value is not None and not Path(value).exists():
            raise BadInput(f"chat {option}: model folder not found: {value}")

    chat_loop(path, teacher=teacher, max_tokens=max_tokens, temperature=temp, system=system)


@cli.group()
def cache():
    """Inspect, verify or repair a teacher cache."""


@cache.command("info")
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True)
def cache_info(path, as_json):
    """Rows, tokens, bytes per token, teacher, targets and fingerprint."""
    from mlx_distill.cache import cache_info as info

    _emit(info(path), as_json)


@cache.command("verify")
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True)
def cache_verify(path, as_json):
    """Check checksums, row counts and fingerprints; name the first bad shard."""
    from mlx_distill.cache import verify_cache

    _emit(verify_cache(path), as_json)


@cache.command("repair")
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True)
@click.option("--no-progress", is_flag=True)
def cache_repair(path, as_json, no_progress):
    """Rescore only the damaged or missing shards of a run's cache (runs/NAME/cache)."""
    from pathlib import Path

    from mlx_distill.train.distributed import launched_backend

    if launched_backend() is not None:
        raise BadInput("cache repair runs in one process; start it without mlx.launch")

    from mlx_distill.run.commands import repair_cache

    _emit(repair_cache(Path(path), progress=not no_progress), as_json)


def _step_option(flag: str, default: int, what: str, low: int = 1):
    """A `bench step` size: an integer of at least `low`, its default shown in --help."""
    return click.option(
        flag,
        type=click.IntRange(min=low),
        default=default,
        show_default=True,
        help=f"bench step: {what}",
    )


@cli.command()
@click.argument(
    "what", type=click.Choice(["loss", "step", "cache", "teacher", "all"]), default="all"
)
@click.option("--size", default=None, help="Loss size N,V,d (bench loss).")
@_step_option("--layers", 2, "blocks of the Qwen2.5-0.5B-shaped model.")
@_step_option("--batch", 4, "sequences per step.")
@_step_option("--seq", 1024, "tokens per sequence.")
@_step_option("--steps", 2, "timed steps per variant (after one warm-up step).")
@_step_option("--vocab", 151_936, "vocabulary size (Qwen2.5's by default).", low=2)
@click.option(
    "--train",
    "trains",
    type=click.Choice(["full", "lora"]),
    multiple=True,
    help="bench step: full and/or lora (repeatable; default both).",
)
@click.option("--grad-checkpoint", is_flag=True, help="bench step: checkpoint every block.")
@click.option("--json", "as_json", is_flag=True)
def bench(what, size, layers, batch, seq, steps, vocab, trains, grad_checkpoint, as_json):
    """Benchmarks: fused loss, training step (against mlx-lm's), cache, teacher client."""
    from mlx_distill.bench import run_bench

    step = dict(layers=layers, batch=batch, seq=seq, steps=steps, grad_checkpoint=grad_checkpoint)
    step.update(vocab=vocab, trains=tuple(trains) or ("full", "lora"))
    _emit(run_bench(what, size, step), as_json)


@cli.command()
@click.option("--json", "as_json", is_flag=True)
def doctor(as_json):
    """Backend, memory, versions, matmul rate, BLAS, Gemini key, distributed backends."""
    from mlx_distill import backend
    from mlx_distill.train import distributed

    _emit(dict(backend.report(), distributed=distributed.describe()), as_json)


def _main(debug: bool) -> int:
    """The command's exit code (see DESIGN.md: 0, 1 failure, 2 bad input, 3 incomplete)."""

    def say(e: BaseException, line: str) -> None:
        dist = sys.modules.get("mlx_distill.train.distributed")
        if dist is None or not dist.quiet(e):  # another rank's error: rank 0 prints it
            if debug:
                traceback.print_exc()
            click.echo(line, err=True)

    try:
        cli.main(standalone_mode=False, prog_name="mlx-distill")
    except SystemExit as e:  # --hosts: the ranks' outcome
        return e.code if isinstance(e.code, int) else 1
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.UsageError as e:  # one line, not click's usage block
        where = e.ctx.command_path if e.ctx is not None else "mlx-distill"
        click.echo(f"error: {where}: {e.format_message()} (see {where} --help)", err=True)
        return 2
    except click.ClickException as e:
        click.echo(f"error: {e.format_message()}", err=True)
        return 2
    except BadInput as e:
        say(e, f"error: {e}")
        return 2
    except StageIncomplete as e:
        say(e, f"stopped: {e}")
        return 3
    except KeyboardInterrupt:
        click.echo("interrupted; rerun the same command to resume", err=True)
        return 130
    except Exception as e:
        say(e, f"error: {type(e).__name__}: {e} (rerun with --debug for the traceback)")
        return 1
    return 0


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A library warning as one line on stderr, without its source line."""
    click.echo(f"warning: {' '.join(str(message).split())}", err=True)


def main() -> None:
    from mlx_distill import backend

    warnings.showwarning = _show_warning
    from mlx_distill.run.side import watch_parent

    watch_parent()  # a side process: exit with the parent, even while still starting up
    backend.setup()  # the fast BLAS on Linux CPU, before anything imports mlx.core
    from mlx_distill.train.launched import mark_launched, report_exit

    mark_launched()  # a rank of `--hosts`
    code = _main("--debug" in sys.argv)
    report_exit(code)  # the launching command reads every rank's code (mlx.launch's is 0)
    sys.exit(code)
