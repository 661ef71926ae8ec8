"""ray_data package."""
