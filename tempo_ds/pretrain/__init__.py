"""tempo_ds.pretrain (work in progress)."""
