"""The tasks behind the entry points: train, predict, evaluate, export."""
