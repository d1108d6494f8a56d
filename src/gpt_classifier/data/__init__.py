"""The SMS data from download to batches; never imports model code."""
