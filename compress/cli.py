"""The ``compress`` command line: run, validate, list (more commands register themselves here)."""
from __future__ import annotations

from pathlib import Path

import click

from compress.cli_options import allow_import_opt, check_output, friendly_errors, recipe_arg, set_opt  # noqa: F401

@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="compress")
def cli():
    """Compress PyTorch models from one YAML recipe: distill, prune, quantize, export, benchmark."""


@cli.command()
@recipe_arg
@set_opt
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Run directory (default: runs/<recipe name>, made unique).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run after its last finished stage/epoch.")
@click.option("--force", is_flag=True, help="Replace an existing run directory made by compress (under runs/ or --out).")
@click.option("--threads", type=click.IntRange(min=1), help="PyTorch CPU threads for training (default: PyTorch's choice).")
@allow_import_opt
@friendly_errors
def run(recipe, overrides, out, resume, force, threads, allow_import):
    """Run every stage of RECIPE and print the report table."""
    check_output("--out", out, folder=True)
    from compress import distributed

    distributed.quiet_non_main()  # under torchrun: rank 0 prints, the others keep stderr for errors
    if threads:
        import torch

        torch.set_num_threads(threads)
    from compress.pipeline import Pipeline
    from compress.report import format_table

    report = Pipeline.from_yaml(recipe, overrides).run(out, resume=resume, force=force, allow_import=allow_import)
    if not distributed.is_main():
        return
    click.echo(format_table(report))
    click.echo(f"\nrun directory: {report['run_dir']}")


@cli.command()
@recipe_arg
@set_opt
@friendly_errors
def validate(recipe, overrides):
    """Check RECIPE (keys, types, names, files, model/data shapes, the search: section) without running or
    writing anything.

    Model specs that import user code (import: pkg.module:factory) are checked for syntax only, never imported."""
    from compress.pipeline import Pipeline
    from compress.safety import ALLOW_IMPORT_ENV, checking_only

    p = Pipeline.from_yaml(recipe, overrides)
    with checking_only():  # no folder's own Python runs, nothing is downloaded, whatever the environment says
        state = p.validate(allow_import=False)
    searched = p.validate_search()
    stages = " -> ".join(s.name for s in p.recipe.stages)
    click.echo(f"ok: {p.recipe.name}: {state.data.task} on {p.recipe.data.name} "
               f"(input {tuple(state.data.input_shape)}, {state.data.num_outputs} outputs); stages: {stages}")
    if searched is not None:
        import importlib.util

        from compress.search.engine import INSTALL

        click.echo(f"ok: search: {len(searched.space)} key path(s), {searched.trials} trials")
        if importlib.util.find_spec("optuna") is None:
            click.echo(f"note: 'compress search' needs Optuna, which is not installed: {INSTALL}")
    for path, target in p.recipe.imports():
        click.echo(f"note: {path}: imports {target!r} (not imported or checked here); "
                   f"'compress run' needs --allow-import or {ALLOW_IMPORT_ENV}=1")


# Model sources that are not registry names (compress.models.external resolves them).
MODEL_SOURCES = (
    ("<torchvision>", "any torchvision.models classifier by name (resnet50, mobilenet_v3_small, ...)"),
    ("timm:<name>", "any timm model (pip install 'compress[timm]'); kwargs, weights: <file>, pretrained: true"),
    ("hf:<folder>", "a local Hugging Face folder, or hf:<org>/<name> from the hub when a run may download "
                    "(pip install 'compress[hf]'); inline config: {name: hf, config: {...}}"),
    ("import:", "import: pkg.module:factory, your own model factory (runs code: needs --allow-import)"),
)


@cli.command("list")
@click.argument("what", required=False, type=click.Choice(["stages", "models", "datasets"]))
def list_(what):
    """List registered stages, models and datasets."""
    import compress.stages  # noqa: F401
    from compress.data import DATASETS
    from compress.models import MODELS
    from compress.stages.base import STAGES

    for title, reg in (("stages", STAGES), ("models", MODELS), ("datasets", DATASETS)):
        if what and what != title:
            continue
        click.echo(f"{title}:")
        for e in reg:
            click.echo(f"  {e.name:<14} {e.description}")
        if title == "models":
            for source, description in MODEL_SOURCES:
                click.echo(f"  {source:<14} {description}")


from compress import cli_report  # noqa: E402  (commands live beside; shared options in cli_options)
cli.add_command(cli_report.bench)
cli.add_command(cli_report.report)
from compress.cli_sensitivity import sensitivity as _sensitivity  # noqa: E402
cli.add_command(_sensitivity)
from compress.cli_search import search as _search  # noqa: E402
cli.add_command(_search)
from compress.cli_pack import pack as _pack  # noqa: E402
cli.add_command(_pack)
from compress.cli_quantize import quantize as _quantize  # noqa: E402
cli.add_command(_quantize)
from compress.cli_generate import generate as _generate  # noqa: E402
cli.add_command(_generate)


def main():
    cli(prog_name="compress")


if __name__ == "__main__":
    main()
