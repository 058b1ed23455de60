"""Where a run's artefacts live: atomic file writes and safetensors checkpoints (``files``)."""
