"""What runs on an edge device: the Flower ClientApp and the client's local state."""
