"""kvroute.proto."""
