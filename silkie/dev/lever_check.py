"""`scripts/lever_check.py`: each speed lever (`bench_levers`) against the fp32 reference on one batch of pairs.

The same random Qwen-VL (tiny, or the published size) scores the same pairs (images included) in fp32 as the
reference, then in the run's dtype with the default kernels and with each lever. Per lever: the largest difference
of a pair's summed answer log-prob and of a logit from the fp32 reference and from the default path, and the
forward time; a lever that cannot run here (liger-kernel without CUDA, say) records its one-line error.
`--tiny --device cpu --dtype fp32` checks the script without a GPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from silkie.dev.bench_levers import lever_keys

logger = logging.getLogger(__name__)

SIZES = [(5, 30, 24), (9, 13, 40), (2, 25, 5), (12, 8, 16)]  # prompt / chosen / rejected text tokens per pair


def _scores(model: torch.nn.Module, batch: dict, pairs_per_row: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(summed chosen and rejected log-probs [2, B], the logits of the chosen rows, seconds) without gradients."""
    from silkie.dpo.step import StepOptions, score_answers

    start = time.perf_counter()
    with torch.no_grad():
        scores = score_answers(model, batch, StepOptions(pairs_per_row=pairs_per_row), 0, no_grad=True)
        logits = model(input_ids=batch["chosen_input_ids"], use_cache=False).logits.float()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    logps = torch.stack([scores.chosen_logps, scores.rejected_logps]).float()
    return logps, logits, time.perf_counter() - start


def check_levers(device: str, tiny: bool, dtype_name: str, levers: list[str], out: Path | None = None) -> dict:
    """Per lever: max |logp| and |logit| differences against the fp32 reference and the default path (written to
    `out/lever_check.json` after every lever, so a time limit keeps the levers checked)."""
    from silkie.config import ModelSection
    from silkie.dev.probe import random_pair_batch, tiny_config
    from silkie.dev.tiny_qwen_vl import random_model
    from silkie.models.kernels import apply_kernels
    from silkie.models.qwen_vl.configuration import official_config
    from silkie.models.varlen import constructible

    config = tiny_config() if tiny else official_config()
    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    batch = random_pair_batch(config, SIZES, [True, False, True, True], seed=3)
    batch = {k: v.to(device) for k, v in batch.items()}
    torch.manual_seed(0)
    reference = random_model(config, device, torch.float32).eval()
    exact_logps, exact_logits, _ = _scores(reference, batch, 1)
    state = reference.state_dict()
    del reference
    device_name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    report: dict = {"pairs": len(SIZES), "dtype": dtype_name, "device_name": device_name, "levers": {}}
    default = None
    for spec in ["default", *levers]:
        keys = {} if spec == "default" else lever_keys(spec)
        attn = keys.get("model", {}).get("attn_implementation", "sdpa")
        config._attn_implementation = constructible(attn)
        model = random_model(config, device, dtype).eval()
        model.config._attn_implementation = attn
        model.load_state_dict(state)
        try:
            switches = {k: v for k, v in keys.get("model", {}).items() if k != "attn_implementation"}
            apply_kernels(model, ModelSection(path="unused", family="qwen_vl", **switches))
            _scores(model, batch, keys.get("dpo", {}).get("pairs_per_row", 1))  # warm-up (compilation)
            logps, logits, seconds = _scores(model, batch, keys.get("dpo", {}).get("pairs_per_row", 1))
        except Exception as err:  # noqa: BLE001 - a lever that cannot run here is reported, the others go on
            report["levers"][spec] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}
            logger.info("%s: %s", spec, report["levers"][spec]["error"])
            _write(report, out)
            continue
        finally:
            del model
        row = {
            "max_abs_logp_diff_vs_fp32": (logps - exact_logps).abs().max().item(),
            "max_abs_logit_diff_vs_fp32": (logits - exact_logits).abs().max().item(),
            "forward_seconds": seconds,
        }
        if default is None:
            default = (logps, logits)
        else:
            row["max_abs_logp_diff_vs_default"] = (logps - default[0]).abs().max().item()
            row["max_abs_logit_diff_vs_default"] = (logits - default[1]).abs().max().item()
        report["levers"][spec] = row
        logger.info("%s: %s", spec, json.dumps({k: round(v, 6) for k, v in row.items()}))
        _write(report, out)
    return report


def _write(report: dict, out: Path | None) -> None:
    if out is not None:
        (out / "lever_check.json").write_text(json.dumps(report, indent=2))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The check's command line (an unknown lever is refused here, before any model is built)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="the tiny model (default: Qwen-VL-Chat's size)")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    parser.add_argument("--levers", nargs="+", default=["native_norm", "flex", "varlen", "compile", "pack4", "liger"])
    parser.add_argument("--out", type=Path, default=Path("lever_check_out"))
    args = parser.parse_args(argv)
    for spec in args.levers:
        lever_keys(spec)
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the check and write `lever_check.json` to --out."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[lever_check %(asctime)s] %(message)s", datefmt="%H:%M:%S")
    args.out.mkdir(parents=True, exist_ok=True)
    check_levers(args.device, args.tiny, args.dtype, args.levers, args.out)
    return 0
