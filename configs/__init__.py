"""The Hydra presets, shipped as the package scaling.configs and read as pkg://scaling.configs (see pyproject.toml)."""
