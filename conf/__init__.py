"""fedkd's Hydra configs, installed as the package ``fedkd.conf`` (data files only)."""
