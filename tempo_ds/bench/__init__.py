"""tempo_ds.bench (work in progress)."""
