"""FLUX architecture knowledge: MLP sites, timesteps, tiny pipeline builders (no interp library)."""
