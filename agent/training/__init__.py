"""Training: the parent-side supervisor and the child process that trains (the only ultralytics user).

Kept empty on purpose: `python -m agent.training.child` imports this package first and must start fast.
"""
