"""Using a trained model: predict on images, evaluate a split, export the weights for deployment."""
