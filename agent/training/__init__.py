"""Training: the parent side that starts, watches and stops a child, and the child that trains.

Kept empty on purpose: `python -m agent.training.child` imports this package first and must start fast.
"""
