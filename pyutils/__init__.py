"""Third-party dataset APIs, rewritten for Python 3."""
