"""Feature dashboards: corpus scans of dictionaries (top examples per step, quantiles, profiles,
strongest tokens), ground-truth concept labels on the shapes world, and Neuronpedia export.

See :mod:`difract_ext.dashboards.store` for the folder format.
"""
