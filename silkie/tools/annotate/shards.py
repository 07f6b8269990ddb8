"""`silkie annotate sample --processes N`: N processes answer one shard of the instructions each (on their own GPU
with `--devices`), each into its own append-only file; the files are merged into answers.jsonl when all are done.
A rerun resumes every shard where it stopped."""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections import Counter
from pathlib import Path

from silkie.tools.annotate.files import ANSWERS, read_jsonl
from silkie.tools.annotate.sample import merge_shards
from silkie.tools.cli import ToolError


def child_command(args: argparse.Namespace, index: int) -> list[str]:
    """The `silkie annotate sample` command of shard `index`."""
    command = [sys.executable, "-m", "silkie", "annotate", "sample", "--pool", args.pool]
    command += ["--instructions", args.instructions, "--images", args.images, "--out", args.out]
    command += ["--shard", f"{index}/{args.processes}"]
    return command + (["--no-progress"] if args.no_progress or index else [])  # one progress bar on screen


def sample_in_processes(args: argparse.Namespace, out: Path) -> dict:
    """Run the shards side by side, then merge them; returns {answers, new, per_model}."""
    import os

    devices = args.devices.split(",") if args.devices else None
    if devices is not None and len(devices) != args.processes:
        raise ToolError(f"--devices {args.devices}: give one device per process ({args.processes})")
    children = []
    for index in range(args.processes):
        env = dict(os.environ)
        if devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = devices[index]
        children.append(subprocess.Popen(child_command(args, index), env=env, stdout=sys.stderr))
    codes = [child.wait() for child in children]
    failed = [index for index, code in enumerate(codes) if code != 0]
    if failed:
        raise ToolError(f"shards {failed} failed (exit {[codes[i] for i in failed]}): rerun to resume them")
    new = merge_shards(out)
    per_model = Counter(r["model"] for r in read_jsonl(out / ANSWERS))
    return {"answers": sum(per_model.values()), "new": new, "per_model": dict(per_model)}
