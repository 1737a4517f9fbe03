"""bluestream.daemon."""
