"""What the tools share, none of it the method itself: files and flags, checkpoints, the model's inputs and
CLIP's weights, a run's settings and folder, inference on images, and the pictures of a model at work."""
