"""The operator console: server-rendered pages over the fleet, refreshed by polling; writes go through services."""
