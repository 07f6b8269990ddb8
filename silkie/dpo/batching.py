"""Turn a collated batch of pairs into model rows and the positions whose next token is scored.

Two layouts give identical per-pair log-probs:
- `concat_rows` (reference, TRL-equivalent): 2B rows, prompt+chosen and prompt+rejected.
- `packed_rows` (shared prompt): B rows of prompt | chosen | rejected, under a block mask where each
  answer sees the prompt and itself, never the other answer, with positions restarting after the prompt;
  optionally several pairs per row (no padding between them), each seeing only itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from silkie.data.collator import SEQUENCE_KEYS
from silkie.models.varlen import VarlenLayout, layout_from_segments


@dataclass
class ScoredRows:
    """Model inputs plus, per answer token, its predictor position (flat index into rows) and pair.

    Concatenated rows carry their 2-D padding mask; packed rows carry each token's `owner` (pair, -1 pad) and
    `segment` (0 prompt, 1 chosen, 2 rejected, -1 pad), from which `attention_mask_on` builds the [R, 1, W, W]
    block mask on the device that uses it (built on the host it is the step's largest host cost: O(R W^2)).
    """

    input_ids: torch.Tensor
    padding_mask: torch.Tensor | None
    owner: torch.Tensor | None
    segment: torch.Tensor | None
    position_ids: torch.Tensor | None
    image_order: torch.Tensor  # index into the batch's images for each image span, row-major
    video_order: torch.Tensor  # the same for video spans
    chosen_index: torch.Tensor
    chosen_targets: torch.Tensor
    chosen_pair: torch.Tensor
    rejected_index: torch.Tensor
    rejected_targets: torch.Tensor
    rejected_pair: torch.Tensor
    layout: VarlenLayout | None = None  # packed rows for `varlen` attention (instead of the block mask)

    def attention_mask_on(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The rows' attention mask on `device` (default: the rows' own): the padding mask [R, W] of concatenated
        rows, or the block mask [R, 1, W, W] of packed rows (True = attend)."""
        if self.padding_mask is not None:
            return self.padding_mask.to(device)
        return block_mask(self.owner.to(device), self.segment.to(device))

    def packed_segments(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Packed rows' (`owner`, `segment`), on the host where they were cut; None for concatenated rows."""
        return None if self.owner is None else (self.owner, self.segment)

    def sequence_counts(self, pair_weight: torch.Tensor | None = None) -> torch.Tensor:
        """[R, W] how many of the 2B sequences prompt+chosen, prompt+rejected each row token stands for: 1 per
        token of concatenated rows; in packed rows 2 per shared prompt token, 1 per answer token; 0 for padding;
        times its pair's `pair_weight` [B] when given (0: a pair left out of the loss)."""
        if self.padding_mask is not None:
            counts = self.padding_mask.long()
            pairs = torch.arange(counts.size(0)) % (counts.size(0) // 2)  # rows: B chosen, then B rejected
        else:
            counts = torch.where(self.segment == 0, 2, (self.segment > 0).long())
            pairs = self.owner.clamp(min=0)
        if pair_weight is None:
            return counts
        weights = pair_weight.cpu().to(torch.float32)
        return counts * (weights[pairs] if pairs.dim() == 2 else weights[pairs][:, None])


def block_mask(owner: torch.Tensor, segment: torch.Tensor) -> torch.Tensor:
    """[R, 1, W, W] mask of packed rows (True = attend): causal within a pair, an answer sees its prompt and itself
    (never the other answer, nor another pair); a padding position sees only itself (no empty softmax row)."""
    width = owner.size(1)
    causal = torch.ones(width, width, dtype=torch.bool, device=owner.device).tril()
    query_seg, key_seg = segment[:, :, None], segment[:, None, :]
    same_pair = owner[:, :, None] == owner[:, None, :]
    visible = same_pair & ((key_seg == 0) | (key_seg == query_seg))
    mask = (causal[None] & visible & (key_seg >= 0)) | torch.eye(width, dtype=torch.bool, device=owner.device)[None]
    return mask[:, None]


TOKEN_KEYS = tuple(f"{part}_{kind}" for part in SEQUENCE_KEYS for kind in ("input_ids", "attention_mask"))
# the media's small index tensors: counts, and the grids and frame times that M-RoPE positions are computed from
MEDIA_INDEX_KEYS = ("image_counts", "video_counts", "image_grid_thw", "video_grid_thw", "second_per_grid_ts")


def on_host(batch: dict) -> dict:
    """The batch with its token and media-index tensors on the CPU, each read back once (pixels stay where they
    are): rows and positions are cut on the host, where reading a device tensor slice by slice would wait for the
    device at every slice."""
    keys = [key for key in (*TOKEN_KEYS, *MEDIA_INDEX_KEYS) if isinstance(batch.get(key), torch.Tensor)]
    return {**batch, **{key: batch[key].cpu() for key in keys}}


def _lengths(mask: torch.Tensor) -> list[int]:
    return [int(n) for n in mask.sum(dim=1).tolist()]


def _media_order(batch: dict, kind: str, repeats: int) -> torch.Tensor:
    """The batch's images (videos) are in (pair, position) order, as the rows' spans are: each row block repeats
    them once."""
    counts = batch.get(f"{kind}_counts")
    total = int(counts.sum()) if counts is not None else 0
    return torch.arange(total).repeat(repeats)


def concat_rows(batch: dict, pad_token_id: int) -> ScoredRows:
    """2B right-padded rows: [prompt, chosen] for pairs 0..B-1, then [prompt, rejected]."""
    batch = on_host(batch)
    prompts, p_len = batch["prompt_input_ids"], _lengths(batch["prompt_attention_mask"])
    answers = {"chosen": batch["chosen_input_ids"], "rejected": batch["rejected_input_ids"]}
    a_len = {k: _lengths(batch[f"{k}_attention_mask"]) for k in answers}
    size = len(p_len)
    width = max(p_len[b] + a_len[k][b] for k in answers for b in range(size))
    ids = torch.full((2 * size, width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((2 * size, width), dtype=torch.long)
    picks: dict[str, tuple[list[int], list[int], list[int]]] = {}
    for offset, kind in enumerate(answers):
        index, targets, pairs = [], [], []
        for b in range(size):
            row, lp, la = offset * size + b, p_len[b], a_len[kind][b]
            ids[row, :lp] = prompts[b, :lp]
            ids[row, lp : lp + la] = answers[kind][b, :la]
            mask[row, : lp + la] = 1
            index.extend(row * width + lp - 1 + k for k in range(la))
            targets.extend(answers[kind][b, :la].tolist())
            pairs.extend([b] * la)
        picks[kind] = (index, targets, pairs)
    return ScoredRows(
        input_ids=ids,
        padding_mask=mask,
        owner=None,
        segment=None,
        position_ids=None,
        image_order=_media_order(batch, "image", 2),
        video_order=_media_order(batch, "video", 2),
        **_pick_tensors(picks),
    )


def packed_rows(
    batch: dict,
    pad_token_id: int,
    prompt_positions: torch.Tensor | None = None,
    pairs_per_row: int = 1,
    varlen: bool = False,
) -> ScoredRows:
    """Rows of prompt | chosen | rejected with a block-causal mask and restarted answer positions.

    `pairs_per_row` > 1 puts that many consecutive pairs in one row (padding-free packing): each pair's tokens see
    only its own prompt and answer, and its positions start from 0, so every pair scores as in a row of its own.
    `prompt_positions` [D, B, Lp] are multi-axis prompt positions (M-RoPE); each answer then continues from
    the prompt's last position + 1 (the prompt ends in text, whose axes agree), as it does in its own unpacked
    row; not from the largest position, which a video's temporal axis can put past the text that follows it.
    Without them positions are 1-D: 0..Lp-1 for the prompt, Lp.. for each answer.
    `varlen`: the rows also carry their `VarlenLayout` (padding-free sequences for varlen attention).
    """
    batch = on_host(batch)
    prompts, p_len = batch["prompt_input_ids"], _lengths(batch["prompt_attention_mask"])
    chosen, c_len = batch["chosen_input_ids"], _lengths(batch["chosen_attention_mask"])
    rejected, r_len = batch["rejected_input_ids"], _lengths(batch["rejected_attention_mask"])
    size = len(p_len)
    n_rows = -(-size // pairs_per_row)
    spans = [p_len[b] + c_len[b] + r_len[b] for b in range(size)]
    width = max(sum(spans[r * pairs_per_row : (r + 1) * pairs_per_row]) for r in range(n_rows))
    ids = torch.full((n_rows, width), pad_token_id, dtype=torch.long)
    owner = torch.full((n_rows, width), -1, dtype=torch.long)  # the pair a token belongs to, -1 pad
    segment = torch.full((n_rows, width), -1, dtype=torch.long)  # 0 prompt, 1 chosen, 2 rejected, -1 pad
    axes = 1 if prompt_positions is None else prompt_positions.size(0)
    positions = torch.zeros((axes, n_rows, width), dtype=torch.long)
    picks = {"chosen": ([], [], []), "rejected": ([], [], [])}
    for b in range(size):
        row, at = b // pairs_per_row, sum(spans[b - b % pairs_per_row : b])
        lp, lc, lr = p_len[b], c_len[b], r_len[b]
        answer_at, rejected_at = at + lp, at + lp + lc
        ids[row, at:answer_at], ids[row, answer_at:rejected_at], ids[row, rejected_at : rejected_at + lr] = (
            prompts[b, :lp],
            chosen[b, :lc],
            rejected[b, :lr],
        )
        owner[row, at : at + spans[b]] = b
        segment[row, at:answer_at], segment[row, answer_at:rejected_at] = 0, 1
        segment[row, rejected_at : rejected_at + lr] = 2
        if prompt_positions is None:
            positions[:, row, at:answer_at], start = torch.arange(lp), lp
        else:
            positions[:, row, at:answer_at] = prompt_positions[:, b, :lp]
            start = int(prompt_positions[:, b, lp - 1].max()) + 1 if lp else 0
        positions[:, row, answer_at:rejected_at] = torch.arange(start, start + lc)
        positions[:, row, rejected_at : rejected_at + lr] = torch.arange(start, start + lr)
        base = row * width
        picks["chosen"][0].extend(base + answer_at - 1 + k for k in range(lc))
        picks["chosen"][1].extend(chosen[b, :lc].tolist())
        picks["chosen"][2].extend([b] * lc)
        picks["rejected"][0].extend(base + (answer_at - 1 if k == 0 else rejected_at + k - 1) for k in range(lr))
        picks["rejected"][1].extend(rejected[b, :lr].tolist())
        picks["rejected"][2].extend([b] * lr)
    return ScoredRows(
        input_ids=ids,
        padding_mask=None,
        owner=owner,
        segment=segment,
        position_ids=positions[0] if prompt_positions is None else positions,
        image_order=_media_order(batch, "image", 1),
        video_order=_media_order(batch, "video", 1),
        **_pick_tensors(picks),
        layout=layout_from_segments(owner, segment) if varlen else None,
    )


def _pick_tensors(picks: dict) -> dict[str, torch.Tensor]:
    out = {}
    for kind, (index, targets, pairs) in picks.items():
        out[f"{kind}_index"] = torch.tensor(index, dtype=torch.long)
        out[f"{kind}_targets"] = torch.tensor(targets, dtype=torch.long)
        out[f"{kind}_pair"] = torch.tensor(pairs, dtype=torch.long)
    return out
