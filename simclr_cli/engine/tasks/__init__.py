"""Tasks: one `run(cfg, ...)` per command. Tasks import blocks, never each other."""
