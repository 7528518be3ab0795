"""kvroute.client."""
