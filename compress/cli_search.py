"""``compress search RECIPE``: the recipe's ``search:`` space, explored by Optuna under its constraints."""
from __future__ import annotations

from pathlib import Path

import click

from compress.cli_options import allow_import_opt, check_output, friendly_errors, recipe_arg, set_opt
from compress.errors import RecipeError


@click.command("search")
@recipe_arg
@set_opt
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Search directory (default: runs/<recipe name>-search, made unique).")
@click.option("--trials", type=click.IntRange(min=1), default=None, help="Trials in all (default: search.trials).")
@click.option("--time-limit", default=None, help="Stop starting trials after this long (45m, 90s, 2h).")
@click.option("--resume", is_flag=True, help="Continue the search in --out (default: the newest of "
              "runs/<recipe name>-search*); its finished trials are kept.")
@click.option("--force", is_flag=True, help="Replace an existing search directory made by compress (under runs/ or --out).")
@click.option("--compare", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="A hand-written recipe to run and measure side by side with the chosen model.")
@click.option("--jobs", type=click.IntRange(min=1), default=None,
              help="Worker processes on the shared study (default: search.jobs, 1); latency is measured one "
                   "trial at a time.")
@allow_import_opt
@friendly_errors
def search(recipe, overrides, out, trials, time_limit, resume, force, compare, jobs, allow_import):
    """Search RECIPE's search.space for the best model meeting search.constraints; write trials.jsonl,
    front.json, result.json, chosen/ and search.html."""
    from compress.recipe import apply_override, read_yaml
    from compress.safety import allowing_imports
    from compress.search.config import parse_duration
    from compress.search.engine import require_optuna, search as run_search

    check_output("--out", out, folder=True)
    require_optuna()
    limit = None
    if time_limit is not None:
        try:
            limit = parse_duration(time_limit)
        except ValueError as exc:
            raise RecipeError("--time-limit", str(exc)) from None
    doc = read_yaml(recipe)
    for o in overrides:
        apply_override(doc, o)
    with allowing_imports(allow_import):
        res = run_search(doc, out=out, resume=resume, force=force, trials=trials, time_limit=limit, compare=compare,
                         jobs=jobs, log=click.echo)
    from compress.search.explain import describe

    click.echo(res.message)
    for line in describe(res.explain):
        click.echo(line)
    click.echo(f"stage reuse: {res.reuse['hits']} cached prefixes loaded, about {res.reuse['saved_seconds']} s saved")
    click.echo(f"search directory: {res.out}  (search.html, trials.jsonl, front.json, chosen/)")
