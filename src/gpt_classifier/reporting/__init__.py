"""Run reports: metrics files, sweep summaries, plots, TensorBoard writing."""
