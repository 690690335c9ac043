"""extrapolax.models: see README.md in this folder."""
