"""extrapolax.pallas_kernels: see README.md in this folder."""
