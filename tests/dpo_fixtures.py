"""Random collated pair batches for DPO-step tests (same layout as silkie.data.collator)."""

from silkie.dev.probe import random_pair_batch  # noqa: F401
