"""What the pathologist labels and what training reads: tissue classes, datasets, the project folder."""
