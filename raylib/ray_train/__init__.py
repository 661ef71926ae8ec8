"""ray_train package."""
