"""The engine: `tasks/` (one `run` per command), `methods/` (one module per pretraining method), `trainer.py` (the
method-agnostic pretraining loop) and, directly here, the building blocks they share.

Nothing here imports Typer or rich; tasks report progress through `simclr_cli.engine.report`.
"""
