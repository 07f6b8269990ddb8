"""Ask a model (optionally with a trained LoRA adapter) about images or a video, in one turn or several.

For Qwen-VL-Chat the prompt is its own: `Picture 1: <img>IMAGE</img>\\nQUESTION` inside the ChatML context (--image
repeated: `Picture 2: ...`, in order); Qwen2-VL / LLaVA use the checkpoint's chat template, and Qwen2-VL takes
--video too. `<image>` / `<video>` markers in the question place them; else they go first. Tokens are
printed as they are generated; generation stops at <|im_end|>. Greedy decoding unless --sample.
--compare (needs --adapter) prints the base answer (adapter disabled) and the DPO answer as two labelled blocks.
Several turns (every family): --history FILE puts earlier turns before the question, as training renders a pair's
earlier turns; --interactive reads one question per line after the first answer (an empty line or end of input
stops); --save-history FILE keeps the conversation for a later --history (Qwen2-VL / LLaVA turns list their
"images" / "videos", placed by the markers the saved question holds). Qwen-VL-Chat drops earlier turns oldest
first beyond 6144 tokens, as the original.

Example: python scripts/chat.py --model runs/assets/tiny-qwen-vl --adapter runs/demo/adapter \\
    --image photo.jpg --question "What is in the picture?" --compare
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator

from silkie.tools.cli import read_image, run_cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="base (or merged) checkpoint folder")
    parser.add_argument("--adapter", help="LoRA adapter folder (RUN/adapter)")
    parser.add_argument(
        "--image",
        action="append",
        help="image file, repeatable in order (with the first question; none: a text-only question, as training's "
        "text-only pairs)",
    )
    parser.add_argument("--video", action="append", help="video file, repeatable (Qwen2-VL / 2.5-VL / 3-VL)")
    parser.add_argument("--question", help="the (first) question; with --interactive, read from stdin if left out")
    parser.add_argument("--history", help='JSON file of earlier turns: [{"user": ..., "assistant": ...}, ...]')
    parser.add_argument("--interactive", action="store_true", help="keep asking: one question per line on stdin")
    parser.add_argument("--save-history", help="write the conversation (history included) to this JSON file")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="answer length limit (256)")
    parser.add_argument("--compare", action="store_true", help="print base and DPO answers (needs --adapter)")
    parser.add_argument(
        "--system",
        help="system message (default: the family's, e.g. Qwen-VL-Chat's 'You are a helpful assistant.'; '' for an "
        "empty one)",
    )
    parser.add_argument("--sample", action="store_true", help="nucleus sampling instead of greedy decoding")
    parser.add_argument("--top-p", type=float, default=0.8, help="nucleus mass with --sample (0.8)")
    parser.add_argument("--temperature", type=float, default=1.0, help="temperature with --sample (1.0)")
    parser.add_argument("--seed", type=int, default=0, help="random seed with --sample (0)")
    parser.add_argument(
        "--dtype",
        choices=("auto", "bf16", "fp16", "fp32"),
        default="auto",
        help="auto: bf16 on a GPU that has it, else fp32",
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: GPU when present)")
    args = parser.parse_args(argv)
    if args.compare and not args.adapter:
        parser.error("--compare needs --adapter")
    if args.question is None and not args.interactive:
        parser.error("--question is required (or --interactive)")
    if args.compare and (args.interactive or args.save_history):
        parser.error("--compare answers one question twice: it does not go with --interactive or --save-history")
    if args.max_new_tokens < 1:
        parser.error("--max-new-tokens must be >= 1")
    if args.sample and not args.temperature > 0:
        parser.error("--temperature must be > 0 with --sample (greedy decoding: leave out --sample)")
    if args.sample and not 0 < args.top_p <= 1:
        parser.error("--top-p must be in (0, 1]")
    return args


def questions(first: str | None) -> Iterator[str]:
    """The first question, then (interactive) one per line from stdin until an empty line or end of input."""
    if first is not None:
        yield first
    while True:
        try:
            line = input("> ")
        except EOFError:
            return
        if not line.strip():
            return
        yield line


def run(args: argparse.Namespace) -> int:
    """Stream the answer(s) to stdout."""
    for image in args.image or []:
        read_image(image)  # a bad image fails fast, before torch and the model are loaded
    from silkie.tools.chat import GenerationOptions, chat_once, converse, read_history, write_history
    from silkie.tools.chat_inputs import check_history

    history = read_history(args.history) if args.history else []
    if history:  # said before the model loads
        check_history(history, args.model)

    options = GenerationOptions(
        max_new_tokens=args.max_new_tokens,
        sample=args.sample,
        top_p=args.top_p,
        temperature=args.temperature,
        seed=args.seed,
    )
    if args.interactive or args.save_history:
        asked = questions(args.question) if args.interactive else iter([args.question])
        converse(
            args.model,
            asked,
            image=args.image,
            adapter_dir=args.adapter,
            history=history,
            options=options,
            system=args.system,  # None: the family's default (--system '': an empty one)
            dtype=args.dtype,
            device=args.device,
            on_turn=(lambda turns: write_history(args.save_history, turns)) if args.save_history else None,
            videos=args.video,
        )
        return 0
    chat_once(
        args.model,
        args.image,
        args.question,
        videos=args.video,
        adapter_dir=args.adapter,
        options=options,
        compare=args.compare,
        system=args.system,  # None: the family's default (--system '': an empty one)
        dtype=args.dtype,
        device=args.device,
        history=history,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point: exit code 0, or 2 with a one-line error."""
    return run_cli(run, parse_args(argv))
