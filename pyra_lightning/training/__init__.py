"""The Lightning system: the LightningModule, callbacks, checkpointing and the LightningCLI."""
