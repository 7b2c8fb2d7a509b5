"""Experiments: training runs, the demo, reports and plots (may use matplotlib and tqdm)."""
