"""Training: the loop, optimizer and schedule, checkpoint/resume."""
