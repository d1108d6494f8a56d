"""Training with Lightning: the LightningModule and the callbacks around it."""
