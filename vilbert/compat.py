"""Every difference between the Paddle versions this project supports (2.6.x, 3.0-3.3), in one place."""
