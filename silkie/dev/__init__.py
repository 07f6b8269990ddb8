"""Development aids: the tiny stand-in checkpoints, the synthetic VLFeedback release and the benchmarks."""
