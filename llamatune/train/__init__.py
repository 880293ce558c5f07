"""Training: the loop (loop.py) and what it stands on: the loss, fast dropout and lean autograd layers, atomic
checkpoints and resume, the run directory, progress and the loss curve; plan and bench size a run before it starts.
"""
