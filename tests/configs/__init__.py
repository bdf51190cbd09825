"""Tests of the experiment configs."""
