"""The run layer: the objective, preflight checks, the session, the loop, robust re-ranking,
progress and workers.
"""
