"""Router training: losses, input pipelines and the training loop."""
