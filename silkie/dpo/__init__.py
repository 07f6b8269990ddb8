"""DPO: losses, answer log-probabilities, reference handling and the trainer."""
