"""Algorithms: objectives, KL schedules, the scoring path, marginal likelihood, PSIS.

Imports only ``pyrovae.model`` (for site names) and ``pyrovae.inference.errors``; never the
experiment or reporting layers above it.
"""
