"""Inference: MC-dropout batch inference on Ray Data actor pools (pseudo-labels, refinement, predict)."""
