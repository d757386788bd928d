"""Data for H3Fusion: the Alpaca prompt format, the real alignment datasets, and a synthetic world."""
