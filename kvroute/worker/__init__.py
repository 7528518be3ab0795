"""kvroute.worker."""
