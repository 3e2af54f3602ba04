"""End-to-end recipes: small, complete experiments that run on a laptop CPU in minutes."""
