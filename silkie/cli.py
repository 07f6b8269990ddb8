"""The `silkie` command: `silkie VERB ...` runs one of the package's programs (`silkie VERB --help` for each)."""

from __future__ import annotations

import sys
from importlib import import_module

COMMANDS: dict[str, tuple[str, str]] = {  # verb -> (module with main(argv), what it does)
    "launch": ("silkie.launch.cli", "train a recipe locally (torchrun) or on Slurm (--gpus N); as launch_dpo.py"),
    "train": ("silkie.train.entry", "one training process (what the launcher starts); as train_dpo.py"),
    "evaluate": ("silkie.tools.evaluate_cli", "held-out reward accuracy and margins of a trained run"),
    "chat": ("silkie.tools.chat_cli", "stream answers about an image (base, adapter or both; several turns)"),
    "merge": ("silkie.tools.merge_cli", "merge a LoRA adapter into its base checkpoint"),
    "prepare": ("silkie.tools.prepare_cli", "check a VLFeedback release, report broken rows, convert to pairs"),
    "internvl-meta": ("silkie.tools.internvl_meta_cli", "InternVL's data meta file (MMPR) as one preference file"),
    "plot": ("silkie.tools.plot_cli", "plot a run's metrics"),
    "annotate": ("silkie.tools.annotate.cli", "build a VLFeedback-format release: pool answers, judge ratings"),
    "bench": ("silkie.dev.bench_cli", "DPO training benchmarks side by side (ours and TRL's)"),
    "bench-data": ("silkie.dev.bench_data", "data pipeline throughput, cold and cached"),
    "demo-assets": ("silkie.dev.demo_assets", "tiny checkpoints of every family and a synthetic release"),
    "tiny-qwen-vl": ("silkie.dev.tiny_qwen_vl_cli", "a tiny random Qwen-VL-Chat checkpoint"),
    "tiny-hf-vlm": ("silkie.dev.tiny_hf_vlm_cli", "a tiny random Qwen2-VL / Qwen3-VL / LLaVA / InternVL folder"),
    "synthetic": ("silkie.dev.synthetic_cli", "a synthetic VLFeedback release"),
    "gpu-check": ("silkie.dev.gpu_check", "the GPU proof run"),
    "lever-check": ("silkie.dev.lever_check", "each speed lever against the fp32 reference on one batch"),
    "reference": ("silkie.dev.recipe_reference", "print the recipe reference (dpo_config/README.md)"),
}


def usage() -> str:
    """The command's help: one line per verb."""
    width = max(len(verb) for verb in COMMANDS)
    lines = ["usage: silkie VERB [options]   (silkie VERB --help for a verb's options)", "", "verbs:"]
    lines += [f"  {verb:<{width}}  {text}" for verb, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run `silkie VERB ARGS`; the verb's exit code (2 for an unknown verb)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    verb, rest = argv[0], argv[1:]
    if verb not in COMMANDS:
        print(f"error: unknown verb {verb!r}; one of {', '.join(COMMANDS)} (see silkie --help)", file=sys.stderr)
        return 2
    sys.argv[0] = f"silkie {verb}"  # argparse names the program after it
    result = import_module(COMMANDS[verb][0]).main(rest)
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
