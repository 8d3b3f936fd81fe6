"""What every benchmark shares: labeled splits, evaluation, result tables, plots."""
