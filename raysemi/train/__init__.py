"""Training on Ray Train: one loop for teacher and student, checkpoints, launch, pipeline steps."""
