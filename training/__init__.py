"""What train.py uses besides the model and the data: checkpoints, preemption signals, progress and W&B logging."""
