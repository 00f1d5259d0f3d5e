"""Progress display and metric sinks."""
