"""The data engine: a pool of models answers instructions, a judge rates the answers, a VLFeedback release follows."""
