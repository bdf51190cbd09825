"""Tests of the launchers and sweeps in launch/."""
