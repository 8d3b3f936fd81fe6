"""The synthvision benchmark: procedural RGB tasks in the regime where model merging is studied."""
