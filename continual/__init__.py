"""Training: ContinualModule (LightningModule), fit_adapter (one task); the continual stream, its
regularizers (O-LoRA, GS-LoRA), replay and metrics build on these."""
