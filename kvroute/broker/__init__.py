"""kvroute.broker."""
