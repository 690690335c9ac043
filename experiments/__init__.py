"""extrapolax.experiments: see README.md in this folder."""
