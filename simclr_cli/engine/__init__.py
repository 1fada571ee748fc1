"""The engine: data, augmentations, model, loss, optimiser, checkpoints and the tasks built on them.

Nothing here imports Typer or rich; tasks report progress through `simclr_cli.engine.report`.
"""
