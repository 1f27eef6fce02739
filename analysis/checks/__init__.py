"""How far to trust a fit: bootstrap and backtests, identification, IsoFLOP quality, seeds, extrapolation, predict."""
