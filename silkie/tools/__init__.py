"""Command-line tools around a trained run: merge, chat, evaluate, plot, and release checks.

Each module holds the library code of one script in `scripts/` (the scripts only parse arguments).
"""
