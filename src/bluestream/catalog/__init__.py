"""bluestream.catalog."""
