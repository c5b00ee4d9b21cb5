"""``compress sensitivity RECIPE``: prune each layer alone at several ratios; table, plot, layer_ratios."""
from __future__ import annotations

from pathlib import Path

import click

from compress.cli_options import allow_import_opt, check_output, friendly_errors, recipe_arg, set_opt
from compress.errors import RecipeError


def _ratios(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise RecipeError("--ratios", f"expected comma-separated numbers in [0, 1), got '{text}'") from None
    bad = [v for v in values if not 0 <= v < 1]
    if not values or bad:
        raise RecipeError("--ratios", f"expected comma-separated numbers in [0, 1), got '{text}'")
    return values


@click.command("sensitivity")
@recipe_arg
@set_opt
@click.option("--layers", default=None, help="Comma-separated module names (default: every prunable layer but the ignored ones).")
@click.option("--ratios", default="0.25,0.5,0.75", show_default=True, help="Fractions to prune, each layer alone.")
@click.option("--method", type=click.Choice(["channel", "magnitude"]), default=None,
              help="Default: the method of the recipe's first prune stage, else channel.")
@click.option("--importance", default=None, help="Channel ranking (default: the prune stage's, else l1).")
@click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="A trained compress checkpoint to analyse. Default: run the recipe's stages before its first prune stage.")
@click.option("--split", type=click.Choice(["val", "test"]), default="val", show_default=True)
@click.option("--max-drop", type=float, default=0.01, show_default=True,
              help="Drop allowed per layer when suggesting layer_ratios (0.01 = 1 accuracy point).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output folder (default: runs/<recipe name>-sensitivity).")
@allow_import_opt
@friendly_errors
def sensitivity(recipe, overrides, layers, ratios, method, importance, checkpoint, split, max_drop, out, allow_import):
    """Prune each layer of RECIPE's model alone at several ratios; write a CSV/Markdown table, a plot and
    a layer_ratios.yaml to paste into a prune stage."""
    from compress.checkpoint import load_model
    from compress.metrics import primary_metric
    from compress.pipeline import Pipeline
    from compress.pruning.masks import classifier_name, prunable_layers
    from compress.pruning.sensitivity import analyse, write_report
    from compress.pruning.structured import IMPORTANCES
    from compress.registry import did_you_mean
    from compress.safety import allowing_imports
    from compress.stages.prune import PruneConfig

    check_output("--out", out, folder=True)
    p = Pipeline.from_yaml(recipe, overrides)
    p.require_imports(allow_import)  # the analysis builds the recipe's models and may run its stages
    first = next((s for s in p.recipe.stages if s.name == "prune"), None)
    cfg: PruneConfig = first.config if first else PruneConfig(method="channel")
    method = method or cfg.method
    importance = importance or getattr(cfg, "importance", "l1")
    if importance not in IMPORTANCES:
        raise RecipeError("--importance", f"unknown importance '{importance}'; expected one of {', '.join(IMPORTANCES.names())}"
                                          f"{did_you_mean(importance, IMPORTANCES.names())}")
    ratio_list = _ratios(ratios)
    state = p.validate(allow_import=allow_import)
    with allowing_imports(allow_import):
        model = load_model(checkpoint) if checkpoint else state.model
    ignored = cfg.ignored_layers if cfg.ignored_layers is not None else [classifier_name(model)]
    known = list(prunable_layers(model))
    names = [n.strip() for n in layers.split(",") if n.strip()] if layers else None
    for n in names or []:
        if n not in known:
            raise RecipeError("--layers", f"no prunable layer named '{n}'; the model has {', '.join(known)}{did_you_mean(n, known)}")
    out = out or Path("runs") / f"{p.recipe.name}-sensitivity"
    if checkpoint is None:
        until = first.index if first else len(p.recipe.stages)
        for spec in p.recipe.stages[:until]:  # e.g. train: the analysis needs a trained model; nothing is written
            click.echo(f"[sensitivity] running stage {spec.index}: {spec.name} first (give --checkpoint to skip)")
        state = p.advance(state, until)  # the same per-stage seeds as a run
        model = state.model
    metric, _ = primary_metric(state.data.task)
    base, rows = analyse(model, state.data, names, ratio_list, method, importance, split, ignored)
    paths = write_report(base, rows, out, metric, max_drop, title=f"{p.recipe.name} ({method}) ")
    click.echo(paths["md"].read_text())
    click.echo(paths["yaml"].read_text())
    for k, v in paths.items():
        click.echo(f"{k}: {v}")
