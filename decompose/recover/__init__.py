"""Recovering accuracy after factorizing: label-free calibration (:mod:`.calibrate`, with
paused forward passes in :mod:`._replay`) and fine-tuning with the original as teacher
(:mod:`.finetune`)."""
