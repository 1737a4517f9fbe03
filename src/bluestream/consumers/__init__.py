"""bluestream.consumers."""
